// Wrapper module: the OCI distribution-spec conformance suite as it was in the
// v1.1 release line (ginkgo, driven by OCI_ROOT_URL / OCI_NAMESPACE / OCI_TEST_*).
// The module proxy serves no v1.1.1 tag of this module; this is the newest v1.1-era
// commit it serves, before the suite was redesigned.
module berth.local/tools/conformance-v1.1

go 1.20

tool github.com/opencontainers/distribution-spec/conformance

require (
	github.com/asaskevich/govalidator v0.0.0-20230301143203-a9d515a09cc2 // indirect
	github.com/bloodorangeio/reggie v0.6.1 // indirect
	github.com/go-logr/logr v1.2.4 // indirect
	github.com/go-resty/resty/v2 v2.7.0 // indirect
	github.com/go-task/slim-sprig v0.0.0-20230315185526-52ccab3ef572 // indirect
	github.com/google/pprof v0.0.0-20230602150820-91b7bce49751 // indirect
	github.com/google/uuid v1.3.0 // indirect
	github.com/mitchellh/mapstructure v1.5.0 // indirect
	github.com/onsi/ginkgo/v2 v2.11.0 // indirect
	github.com/opencontainers/distribution-spec/conformance v0.0.0-20231101194043-f2182352d4cc // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	golang.org/x/net v0.11.0 // indirect
	golang.org/x/sys v0.9.0 // indirect
	golang.org/x/tools v0.10.0 // indirect
)
