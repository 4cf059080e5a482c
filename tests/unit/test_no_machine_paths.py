"""What a reader gets (docs, README, configs, benches) names no path of the machine it was
written on: a user has no /work or /home/someone, and a default pointing there fails for them."""

import re

from tests.helpers import ROOT

# Absolute paths of a machine: home and work folders, temp folders used as defaults, Windows and
# macOS user folders. (A path in an example that the reader replaces, like /path/to/x, is fine.)
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/home/\w|/root/|/tmp/|/Users/\w|/mnt/\w|[A-Z]:\\\\)")
WHERE = ["README.md", "docs", "conf", "bench", "Dockerfile", "compose.yaml", "prefect.yaml"]


def scanned():
    for name in WHERE:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.suffix in {".png", ".jpg", ".svg", ".pyc"} or "__pycache__" in f.parts:
                continue
            yield f


def test_no_absolute_path_of_a_machine_in_docs_conf_or_bench():
    found = []
    for f in scanned():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "machine paths:\n" + "\n".join(found)


def test_the_check_catches_a_machine_path():
    assert MACHINE_PATH.search("root: /work/shared/data/cifar10")
    assert MACHINE_PATH.search("--cache /tmp/bonsai-cifar-cache")
    assert MACHINE_PATH.search("see /home/alice/data")
    assert not MACHINE_PATH.search("data.root=/path/to/cifar10")
    assert not MACHINE_PATH.search("../shared/data/cifar10 and mlruns/tmp/x")
    assert len(list(scanned())) > 50  # it reads the docs, configs and benches
