"""Fault-injection tests: real clusters (tests/conftest.py's ``etcd``, ``coordinator``,
``cluster``, ``world_dir`` fixtures, which pytest finds in the parent folder) with
processes killed, stopped or restarted on purpose. Each test file here stops every
process it started; shared helpers go in the test files, so that several people
can add files to this folder without touching one another's."""
