"""Developer tooling for Berth; not part of the shipped distribution.

- `python -m berth_dev` (`make run`): the local stack, see `stack`.
- `python -m berth_dev.generate`: files derived from others (chart CRDs, plain
  manifests, the CRD reference), with `--check` for CI.
- `python -m berth_dev.smoke`: push an image and pull it back, the check shared by the
  local stack's test and `make e2e-kind`.

It may import `tests.support` (control plane, processes, pod spec runner): a dev tool
reuses the test ground rather than growing a second one.
"""
