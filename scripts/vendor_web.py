"""Vendor the web page's JavaScript libraries from the npm registry into localqwen/web/static/vendor/.

    python scripts/vendor_web.py            # fetch the pinned versions, check them, write the files
    python scripts/vendor_web.py --check    # only check that the vendored files match VERSIONS.json

The page must work offline, so its libraries ship inside the Python package. `npm pack` fetches each pinned package
tarball (npm checks it against the registry's integrity hash); the files the page loads and the licence files are
copied out, and VERSIONS.json records each package's version, licence, tarball integrity and the sha256 of every
copied file. A version already recorded must come back with the same integrity: a changed tarball is refused.
To update a library, change its version below and run the script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "localqwen" / "web" / "static" / "vendor"
VERSIONS = VENDOR / "VERSIONS.json"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    files: dict[str, str]  # path inside the tarball (under package/) -> file name in VENDOR
    licences: tuple[str, ...]  # licence files inside the tarball, copied to VENDOR/licences/<name>-<file>


PACKAGES = (
    Package("marked", "18.2.1", {"lib/marked.umd.js": "marked.umd.js"}, ("LICENSE",)),
    Package("dompurify", "3.5.0", {"dist/purify.min.js": "purify.min.js"}, ("LICENSE", "LICENSE-MPL")),
    # The prebuilt browser bundle with highlight.js's common languages (the main package ships only CommonJS).
    Package("@highlightjs/cdn-assets", "11.12.0", {
        "highlight.min.js": "highlight.min.js",
        "styles/github.min.css": "highlight-github.min.css",
        "styles/github-dark.min.css": "highlight-github-dark.min.css",
    }, ("LICENSE",)),
    # Only the script: the page asks KaTeX for MathML, which needs neither KaTeX's CSS nor its fonts.
    Package("katex", "0.19.1", {"dist/katex.min.js": "katex.min.js"}, ("LICENSE",)),
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def licence_name(package: Package, file: str) -> str:
    return f"licences/{package.name.replace('/', '-').lstrip('@')}-{file}"


def npm_pack(package: Package, into: Path) -> tuple[Path, str]:
    """Download the package tarball with npm; return its path and the registry's integrity hash."""
    spec = f"{package.name}@{package.version}"
    try:
        result = subprocess.run(["npm", "pack", spec, "--json", "--pack-destination", str(into)],
                                capture_output=True, text=True, check=True)
    except FileNotFoundError:
        sys.exit("vendor_web: npm is not installed (Debian: apt-get install npm)")
    except subprocess.CalledProcessError as exc:
        sys.exit(f"vendor_web: npm pack {spec} failed: {exc.stderr.strip().splitlines()[-1:]}")
    [info] = json.loads(result.stdout)
    return into / info["filename"], info["integrity"]


def read_member(archive: tarfile.TarFile, package: Package, path: str) -> bytes:
    try:
        member = archive.extractfile(f"package/{path}")
    except KeyError:
        member = None
    if member is None:
        sys.exit(f"vendor_web: {package.name} {package.version} has no file {path}")
    return member.read()


def vendor(recorded: dict) -> dict:
    versions: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for package in PACKAGES:
            tarball, integrity = npm_pack(package, Path(tmp))
            before = recorded.get(package.name, {})
            if before.get("version") == package.version and before.get("integrity") != integrity:
                sys.exit(f"vendor_web: {package.name} {package.version}: the registry's tarball has integrity "
                         f"{integrity}, VERSIONS.json records {before.get('integrity')}: refusing a changed package")
            with tarfile.open(tarball) as archive:
                manifest = json.loads(read_member(archive, package, "package.json"))
                wanted = {dest: read_member(archive, package, src) for src, dest in package.files.items()}
                wanted |= {licence_name(package, file): read_member(archive, package, file)
                           for file in package.licences}
            for dest, data in wanted.items():
                (VENDOR / dest).parent.mkdir(parents=True, exist_ok=True)
                (VENDOR / dest).write_bytes(data)
            versions[package.name] = {"version": package.version, "license": manifest.get("license"),
                                      "integrity": integrity,
                                      "files": {dest: sha256(data) for dest, data in sorted(wanted.items())}}
    return versions


def check(recorded: dict) -> list[str]:
    """Problems with the vendored files: missing, changed, or not the versions this script pins."""
    problems = []
    for package in PACKAGES:
        entry = recorded.get(package.name)
        if entry is None or entry["version"] != package.version:
            problems.append(f"{package.name}: VERSIONS.json does not record version {package.version}")
            continue
        for dest, digest in entry["files"].items():
            path = VENDOR / dest
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256(path.read_bytes()) != digest:
                problems.append(f"{path}: differs from VERSIONS.json")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the vendored files against VERSIONS.json")
    args = parser.parse_args()
    recorded = json.loads(VERSIONS.read_text()) if VERSIONS.is_file() else {}
    if not args.check:
        recorded = vendor(recorded)
        VERSIONS.write_text(json.dumps(recorded, indent=2) + "\n")
    problems = check(recorded)
    for problem in problems:
        print(f"vendor_web: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    total = sum((VENDOR / dest).stat().st_size for entry in recorded.values() for dest in entry["files"])
    print(f"vendor_web: {len(recorded)} packages, {total // 1024} KiB in {VENDOR}")


if __name__ == "__main__":
    main()
