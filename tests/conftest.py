"""The one way fixtures are shared across test modules: every fixture module is a plugin here, so
a test asks for a fixture by name and imports nothing for it (no `noqa: F401` imports, no
per-module `pytest_plugins`).

- tests.fakes.moto_server: `moto_server`, `aws`, `ec2_world`, `console_from_emulator` and the
  autouse `ec2_leftovers` (checks only tests that used moto);
- tests.cloud.openstack_fixtures: `openstack_fake`, `openstack_conn`, `openstack_cloud_env`,
  `fast_sleeps`, `emu`.
"""

pytest_plugins = ["tests.fakes.moto_server", "tests.cloud.openstack_fixtures"]
