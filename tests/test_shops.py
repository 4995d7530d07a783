"""Several shops on one server: deploy/orders@.service, deploy/shop.env.example, deploy/Caddyfile.shops.

What an agency relies on is that two shops never mix: each instance reads its own export,
key and answers, and writes only its own folders. The template is rendered for two shops
as systemd does (%i the shop's name), the documented commands of docs/DEPLOY.md are run
as they are against temporary folders instead of /etc and /srv (without sudo and chown:
no root needed), and two shops are then served as their units say. Where systemd-analyze
and caddy are installed, they check the files too.
"""

import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Served, free_port, orders_csv, wait_for, write

DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "orders@.service"
SINGLE = DEPLOY / "orders.service"
EXAMPLE = DEPLOY / "shop.env.example"
GUIDE = ROOT / "docs" / "DEPLOY.md"
PATHS = ("ORDERS_FILE", "STATE_DIR", "CONTEXTS_FILE")  # set by the unit from the shop's name, never by its env file
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NO_SYSTEMD = "systemd-analyze is not installed (it comes with the systemd package; .ci/run installs it)"


# systemd, as far as these files use it ######################################################################


def render(text, shop):
    """The unit text for instance shop, its specifiers replaced as systemd does (%i: the name as given, %%: %).

    Comments are left as they are: systemd does not read them.
    """

    def specifier(match):
        assert match.group(1) in "i%", f"orders@.service uses %{match.group(1)}, which render() does not know"
        return shop if match.group(1) == "i" else "%"

    return "\n".join(
        line if line.startswith(("#", ";")) else re.sub(r"%(.)", specifier, line) for line in text.splitlines()
    )


def settings(*texts):
    """{key: [values]} of unit files read in order (a unit, then its drop-ins), as systemd merges them.

    An empty assignment resets a list (ReadWritePaths=); Environment= assignments are kept
    as {variable: value} in "Environment", a later one of a variable winning.
    """
    found = {}
    for text in texts:
        for line in text.splitlines():
            if not line.strip() or line.startswith(("#", ";", "[")):
                continue
            key, _, value = line.partition("=")
            if key == "Environment":
                found.setdefault("Environment", {}).update(dict(item.split("=", 1) for item in shlex.split(value)))
            elif not value:
                found[key] = []
            else:
                found.setdefault(key, []).append(value)
    return found


def read_env_file(path):
    """Variables of an EnvironmentFile= as systemd reads them: KEY=VALUE lines, quotes removed, # comments."""
    env = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value))
    return env


def read_write_paths(found):
    return {Path(p) for value in found.get("ReadWritePaths", []) for p in value.split()}


def within(path, folders):
    return any(Path(path) == folder or Path(path).is_relative_to(folder) for folder in folders)


# The documented commands, run against temporary folders ####################################################


def documented(section, marker):
    """The shell block of docs/DEPLOY.md's section that contains marker."""
    text = GUIDE.read_text()
    assert f"\n## {section}\n" in text, f"docs/DEPLOY.md has no section {section!r}"
    part = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block for block in re.findall(r"```sh\n(.*?)```", part, re.S) if marker in block]
    assert len(blocks) == 1, f"docs/DEPLOY.md, {section!r}: no single shell block with {marker!r}"
    return blocks[0]


def run_documented(block, root, **values):
    """Run a documented block as an ordinary user would, its system folders moved under root.

    Its first line names the shop and port (`shop=shop-a port=8081`); values replace them.
    sudo and chown (-o/-g) are left out, and systemctl is not run (the units are checked
    below, by systemd-analyze where it is installed).
    """
    first, rest = block.split("\n", 1)
    assert re.fullmatch(r"shop=[\w-]+ port=\d+", first), f"the block no longer starts with shop= port=: {first!r}"
    script = " ".join(f"{name}={value}" for name, value in values.items()) + "\n" + rest
    script = script.replace("sudo ", "").replace("-o orders -g orders ", "")
    for system, moved in (
        ("/etc/systemd/system", root / "units"),
        ("/etc/orders", root / "etc" / "orders"),
        ("/srv/orders", root / "srv" / "orders"),
        ("/opt/orders", ROOT),
    ):
        script = script.replace(system, str(moved))
    script = "\n".join(line for line in script.splitlines() if "systemctl " not in line)
    (root / "etc" / "orders").mkdir(parents=True, exist_ok=True)  # step 4 of the guide
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{script}\n{result.stdout}{result.stderr}"


def moved(text, root):
    """A unit's text with its system folders moved as run_documented moves them, and the code at ROOT."""
    for system, new in (
        ("/etc/orders", root / "etc" / "orders"),
        ("/srv/orders", root / "srv" / "orders"),
        ("/opt/orders", ROOT),
    ):
        text = text.replace(system, str(new))
    return text


SHOP_BLOCK = ("Several shops on one server", "systemctl enable --now orders@$shop")
REPLICA_BLOCK = ("Replicas: no single point of failure", "orders@$shop-2.service.d")


# The template ##############################################################################################


@pytest.mark.parametrize("one, other", [("shop-a", "shop-b"), ("shop", "shop-2")])  # a name that starts another
def test_two_shops_units_share_no_path_and_write_only_their_own_folders(one, other):
    template = TEMPLATE.read_text()
    units = {shop: settings(render(template, shop)) for shop in (one, other)}
    for shop, found in units.items():
        env = found["Environment"]
        assert env["ORDERS_FILE"] == f"/srv/orders/{shop}/data"
        assert env["STATE_DIR"] == f"/srv/orders/{shop}/state"
        assert env["CONTEXTS_FILE"] == f"/srv/orders/{shop}/contexts.toml"
        assert found["EnvironmentFile"] == [f"/etc/orders/{shop}.env"]
        # Writes: this shop's data and state folders, nothing else (not even its contexts.toml).
        assert read_write_paths(found) == {Path(env["ORDERS_FILE"]), Path(env["STATE_DIR"])}
        assert not within(env["CONTEXTS_FILE"], read_write_paths(found))
    paths = {shop: {*found["Environment"].values(), *found["EnvironmentFile"]} for shop, found in units.items()}
    assert not paths[one] & paths[other]
    for shop, neighbour in ((one, other), (other, one)):
        assert not any(within(path, read_write_paths(units[shop])) for path in paths[neighbour]), (
            f"{shop} may write where {neighbour} keeps its files"
        )


def test_the_template_keeps_every_setting_of_orders_service_but_its_paths():
    # The same hardening, restart and memory limit; only where the files are differs.
    single, template = settings(SINGLE.read_text()), settings(render(TEMPLATE.read_text(), "shop-a"))
    differ = {"Description", "Documentation", "EnvironmentFile", "ReadWritePaths"}
    for key, values in single.items():
        if key not in differ:
            assert template.get(key) == values, (
                f"orders@.service has {key}={template.get(key)}, orders.service {values}"
            )
    assert set(template) - set(single) == {"Environment"}, "a setting orders.service does not have"


def test_the_example_env_file_sets_what_a_shop_needs_and_leaves_the_paths_to_the_unit():
    env = read_env_file(EXAMPLE)
    assert env["HOST"] == "127.0.0.1" and env["PORT"].isdigit() and env["TRUSTED_PROXY"] == "127.0.0.1"
    assert env["API_KEY"] == read_env_file(DEPLOY / "orders.env.example")["API_KEY"]  # the placeholder the sed replaces
    # A line here would win over the unit's Environment=, and an env file copied from another
    # shop would serve that shop's orders.
    assert not set(PATHS) & set(env)
    # Everything else as for one shop: the same settings, set or shown commented.
    single = DEPLOY / "orders.env.example"
    names = re.compile(r"^#?([A-Z_]+)=", re.M)
    assert set(names.findall(single.read_text())) - set(PATHS) <= set(names.findall(EXAMPLE.read_text()))
    for name, value in read_env_file(single).items():
        if name not in (*PATHS, "PORT"):
            assert env[name] == value, name
    # The CPU each shop keeps to is chosen by the service; the example shows how to pin it.
    assert re.search(r"^#CPU=$", EXAMPLE.read_text(), re.M)


# The documented commands ###################################################################################


@pytest.fixture
def two_shops(tmp_path):
    """shop-a and shop-b added as docs/DEPLOY.md says, each on a free port, with an export of its own."""
    ports = {"shop-a": free_port(), "shop-b": free_port()}
    for shop, port in ports.items():
        run_documented(documented(*SHOP_BLOCK), tmp_path, shop=shop, port=port)
    # Different orders in each shop: shop-a #1..#5, shop-b #101..#105.
    write(tmp_path / "srv/orders/shop-a/data/orders.csv", orders_csv(5))
    write(tmp_path / "srv/orders/shop-b/data/orders.csv", orders_csv(5, first=101))
    return tmp_path, ports


def test_shops_added_as_documented_get_their_own_port_key_and_folders(two_shops):
    root, ports = two_shops
    envs = {shop: root / "etc" / "orders" / f"{shop}.env" for shop in ports}
    keys = set()
    for shop, path in envs.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the key: root's alone
        env = read_env_file(path)
        assert env["PORT"] == str(ports[shop])
        assert len(env["API_KEY"]) >= 40 and env["API_KEY"] != "paste-a-long-random-key-here"
        keys.add(env["API_KEY"])
        for folder in ("data", "state"):
            assert (root / "srv" / "orders" / shop / folder).is_dir()
        assert (root / "srv" / "orders" / shop / "contexts.toml").read_bytes() == (ROOT / "contexts.toml").read_bytes()
    assert len(keys) == 2, "both shops got the same key"


def unit_environment(root, shop, *dropins):
    """The environment systemd gives the shop's service: the unit's Environment=, then its EnvironmentFile=."""
    found = settings(moved(render(TEMPLATE.read_text(), shop), root), *dropins)
    env = dict(found["Environment"])
    for path in found["EnvironmentFile"]:
        env.update(read_env_file(path))
    return env, found


@contextlib.contextmanager
def served_as_unit(root, shop, *dropins):
    """python app.py serve started as systemd starts the shop's unit (its environment only); yields that environment."""
    env, found = unit_environment(root, shop, *dropins)
    for path in (env["ORDERS_FILE"], env["STATE_DIR"]):
        assert within(path, read_write_paths(found)), f"{shop} would write {path}, which its unit keeps read-only"
    with Served(
        [sys.executable, str(ROOT / "app.py"), "serve"],
        {"PATH": os.environ["PATH"], **env},
        found["WorkingDirectory"][0],
    ) as served:
        served.wait_for("INFO serving ")
        yield env


def lookup(env, order, key=None):
    """The status of a lookup of order #order (customer<order>@example.com) from a served shop."""
    connection = http.client.HTTPConnection("127.0.0.1", int(env["PORT"]), timeout=10)
    try:
        connection.request(
            "GET",
            f"/lookup?order_id=%23{order}&customer_email=customer{order}%40example.com",
            headers={"x-api-key": key or env["API_KEY"]},
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_two_shops_served_as_their_units_say_answer_only_their_own_orders(two_shops):
    root, _ = two_shops
    with served_as_unit(root, "shop-a") as env_a, served_as_unit(root, "shop-b") as env_b:
        status, body = lookup(env_a, 1)
        assert status == 200 and json.loads(body)["context"].startswith("Order #1 was found")
        assert lookup(env_b, 101)[0] == 200
        assert lookup(env_a, 101)[0] == 404 and lookup(env_b, 1)[0] == 404  # the other shop's orders
        assert lookup(env_b, 101, key=env_a["API_KEY"])[0] == 401  # and its key
        # Each keeps its copy of the last good export in its own state folder.
        for shop in ("shop-a", "shop-b"):
            wait_for(
                lambda shop=shop: (root / "srv" / "orders" / shop / "state" / "last-good.csv").exists(),
                what=f"{shop}'s last good copy",
            )


def test_a_replica_added_as_documented_serves_its_shops_export_with_its_own_port_and_state(two_shops):
    root, _ = two_shops
    port = free_port()
    run_documented(documented(*REPLICA_BLOCK), root, shop="shop-a", port=port)
    dropin = (root / "units" / "orders@shop-a-2.service.d" / "replica.conf").read_text()
    env, found = unit_environment(root, "shop-a-2", dropin)  # its paths were moved under root as it was written
    shop_a = root / "srv" / "orders" / "shop-a"
    assert env["ORDERS_FILE"] == str(shop_a / "data") and env["CONTEXTS_FILE"] == str(shop_a / "contexts.toml")
    assert env["STATE_DIR"] == str(root / "srv" / "orders" / "shop-a-2" / "state")  # its own webhook store
    assert read_write_paths(found) == {Path(env["ORDERS_FILE"]), Path(env["STATE_DIR"])}
    assert env["PORT"] == str(port) and env["API_KEY"] == read_env_file(root / "etc/orders/shop-a.env")["API_KEY"]
    with served_as_unit(root, "shop-a-2", dropin) as env:
        assert lookup(env, 3)[0] == 200 and lookup(env, 103)[0] == 404


# systemd's own checks ######################################################################################


def systemd_units(root):
    """The units in root/units, where the documented commands put the replica's drop-in, with /opt/orders at this
    checkout and its Python the one running the tests, wherever its virtual environment is (systemd checks that
    ExecStart= exists)."""
    folder = root / "units"
    for name, unit in (("orders@.service", TEMPLATE), ("orders.service", SINGLE)):
        text = unit.read_text().replace("/opt/orders/.venv/bin/python", sys.executable)
        write(folder / name, text.replace("/opt/orders", str(ROOT)))
    return folder


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason=NO_SYSTEMD)
def test_systemd_verifies_the_template_for_two_shops_and_a_replica(two_shops):
    root, _ = two_shops
    run_documented(documented(*REPLICA_BLOCK), root, shop="shop-a", port=free_port())  # its drop-in
    folder = systemd_units(root)
    # systemd substitutes %i itself here: orders@shop-a.service is the template's instance.
    units = [str(folder / f"orders@{shop}.service") for shop in ("shop-a", "shop-b", "shop-a-2")]
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *units], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    # An unknown key or a bad value is only a warning (exit 0): none may mention the units.
    assert result.returncode == 0 and "orders" not in output, output


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason=NO_SYSTEMD)
def test_systemd_rates_the_template_as_hardened_as_orders_service(tmp_path):
    folder = systemd_units(tmp_path)

    def exposure(unit):
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(folder / unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode and "offline" in result.stderr:
            pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {result.stderr.strip()[:200]}")
        assert "Overall exposure level" in result.stdout, result.stdout + result.stderr
        return result.stdout.replace(unit, "UNIT")

    assert exposure("orders@shop-a.service") == exposure("orders.service")


# Caddy #####################################################################################################

CADDY = shutil.which("caddy")


def adapted(path):
    result = subprocess.run(
        [CADDY, "adapt", "--config", str(path), "--adapter", "caddyfile"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sites(config):
    """{host: (its handlers as JSON text, its log's settings)} of an adapted Caddyfile."""
    server = config["apps"]["http"]["servers"]["srv0"]
    loggers, logs = server["logs"]["logger_names"], config["logging"]["logs"]
    return {
        route["match"][0]["host"][0]: (json.dumps(route["handle"]), logs[loggers[route["match"][0]["host"][0]]])
        for route in server["routes"]
    }


@pytest.mark.skipif(CADDY is None, reason="caddy is not installed (apt-get install caddy; .ci/run does)")
def test_the_shops_caddyfile_is_valid():
    result = subprocess.run(
        [CADDY, "validate", "--config", str(DEPLOY / "Caddyfile.shops"), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "Valid configuration" in result.stdout + result.stderr, result.stderr


@pytest.mark.skipif(CADDY is None, reason="caddy is not installed (apt-get install caddy; .ci/run does)")
def test_each_shops_site_does_what_the_single_shop_caddyfile_does_on_its_own_port():
    # Compared as Caddy reads them: the same body limits, timeouts and log filter as
    # deploy/Caddyfile, only the port and the log file the shop's own.
    ((single_handlers, single_log),) = sites(adapted(DEPLOY / "Caddyfile")).values()
    shops = sites(adapted(DEPLOY / "Caddyfile.shops"))
    assert set(shops) == {"shop-a.orders.example.com", "shop-b.orders.example.com"}
    for (host, (handlers, log)), name, port in zip(sorted(shops.items()), ("shop-a", "shop-b"), (8081, 8082)):
        assert handlers == single_handlers.replace("127.0.0.1:8080", f"127.0.0.1:{port}"), host
        assert log["writer"]["filename"] == f"/var/log/caddy/orders-{name}.log"
        assert log["encoder"] == single_log["encoder"]  # the same filter: no emails, no keys


def test_the_readme_adds_a_shop_with_the_same_commands_as_the_guide():
    # The README shows the four commands; the guide's block is the one run above.
    readme = (ROOT / "README.md").read_text().split("\n## Several shops on one server\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", readme, re.S)

    def commands(text):
        return [
            line.split("  #")[0].rstrip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]

    assert commands(block) == commands(documented(*SHOP_BLOCK))
