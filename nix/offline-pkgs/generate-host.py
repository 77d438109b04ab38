#!/usr/bin/env python3
"""Writes host.json: which host binaries and shared libraries make up the
offline package set, with each library's direct dependencies.

Run it again (and commit the result) when the host's Debian packages change:
    python3 nix/offline-pkgs/generate-host.py > nix/offline-pkgs/host.json
With --root DIR it describes another architecture's Debian binaries unpacked
under DIR instead (scripts/offline-root.sh runs it so); paths stay as they are
on that system, and the Nix side puts DIR in front of them.
The Nix side (default.nix) reads host.json as data; nothing here runs at
evaluation time, so evaluating the package set stays fast and pure.
"""
import argparse
import json
import os
import subprocess
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--root", default="", help="an unpacked root of another architecture's packages")
parser.add_argument("--triplet", default="x86_64-linux-gnu", help="its multiarch triplet")
ARGS = parser.parse_args()
ROOT = ARGS.root.rstrip("/")
# The dynamic loader of each architecture this set knows.
INTERPRETERS = {"x86_64-linux-gnu": "ld-linux-x86-64.so.2", "aarch64-linux-gnu": "ld-linux-aarch64.so.1"}
INTERPRETER = INTERPRETERS[ARGS.triplet]
LIB_DIR = f"/usr/lib/{ARGS.triplet}"
# Where else a library may live (Debian's Nix keeps its own in /usr/lib/nix).
EXTRA_LIB_DIRS = ["/usr/lib/nix"]
BIN_DIR = "/usr/bin"
# glibc's own libraries form one package, as in nixpkgs.
GLIBC = {"libc.so.6", "libm.so.6", INTERPRETER, "libresolv.so.2",
         "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1"}

PROGRAMS = {
    "bashInteractive": ["bash"],
    "hello": ["hello"],
    "curl": ["curl"],
    "jq": ["jq"],
    "gnugrep": ["grep"],
    "gnused": ["sed"],
    "findutils": ["find", "xargs"],
    "less": ["less"],
    "nano": ["nano"],
    # Every ELF binary of these Debian packages (moreutils' Perl scripts are left out).
    "coreutils": {"deb": "coreutils"},
    "moreutils": {"deb": "moreutils"},
    # The host's Nix, for the agent image (nix/agent-pkgs): one binary that
    # acts as nix-store, nix-build, ... by the name it is called by.
    "nix": ["nix"],
}
# Other names of a program's binary (symlinks in its bin/).
LINKS = {"nix": {name: "nix" for name in [
    "nix-build", "nix-channel", "nix-collect-garbage", "nix-copy-closure", "nix-daemon",
    "nix-env", "nix-hash", "nix-instantiate", "nix-prefetch-url", "nix-shell", "nix-store"]}}
# Build tools the set's builders run: each is imported with every library it
# loads (the host's files, as they are), so a build needs nothing from the host
# at build time and works inside Nix's sandbox, where one is on.
TOOLS = {"patchelf": "patchelf"}
# nixpkgs' meta.mainProgram, where it differs from the attribute name.
MAIN_PROGRAM = {"bashInteractive": "bash", "gnugrep": "grep", "gnused": "sed", "findutils": "find"}


def at(path):
    """Where a file of the described system is on this machine."""
    return ROOT + path


def unrooted(path):
    return path[len(ROOT):] if ROOT and path.startswith(ROOT + "/") else path


def needed(path):
    out = subprocess.run(["readelf", "-d", at(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def is_elf(path):
    with open(at(path), "rb") as f:
        return f.read(4) == b"\x7fELF"


def lib_attr(soname):
    if soname in GLIBC:
        return "glibc"
    return soname.split(".so", 1)[0]


def package_files(package):
    if ROOT:
        # offline-root.sh keeps each unpacked package's file list.
        with open(f"{ROOT}/.debs/{package}.list") as f:
            return [line.strip().lstrip(".") for line in f if line.strip()]
    return subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout.split()


def package_bins(package):
    bins = set()
    for f in package_files(package):
        name = os.path.basename(f)
        candidate = os.path.join(BIN_DIR, name)
        if "/bin/" in f and os.path.isfile(at(candidate)) and not os.path.islink(at(candidate)) and is_elf(candidate):
            bins.add(name)
    return sorted(bins)


def main():
    libs = {}

    def add_lib(soname):
        attr = lib_attr(soname)
        lib_dir = next((d for d in [LIB_DIR] + EXTRA_LIB_DIRS if os.path.exists(at(os.path.join(d, soname)))), LIB_DIR)
        path = os.path.join(lib_dir, soname)
        real = unrooted(os.path.realpath(at(path)))
        entry = libs.setdefault(attr, {"files": set(), "deps": set()})
        if lib_dir != LIB_DIR:
            entry["dir"] = lib_dir
        entry["files"].update({soname, os.path.basename(real)})
        if attr == "glibc":
            entry["files"].update(GLIBC & set(os.listdir(at(LIB_DIR))))
            return
        for dep in needed(real):
            dep_attr = lib_attr(dep)
            entry["deps"].add(dep_attr)
            if dep_attr not in libs or dep not in libs[dep_attr]["files"]:
                add_lib(dep)

    programs = {}
    for attr, bins in PROGRAMS.items():
        bins = package_bins(bins["deb"]) if isinstance(bins, dict) else bins
        if ROOT and not all(os.path.isfile(at(os.path.join(BIN_DIR, b))) for b in bins):
            # Another architecture's root holds only what offline-root.sh unpacked.
            print(f"generate-host: {attr} is not in {ROOT}; left out", file=sys.stderr)
            continue
        deps = set()
        for b in bins:
            for dep in needed(os.path.join(BIN_DIR, b)):
                deps.add(lib_attr(dep))
                add_lib(dep)
        programs[attr] = {"bins": bins, "libs": sorted(deps)}
        if attr in LINKS:
            programs[attr]["links"] = LINKS[attr]
        main = MAIN_PROGRAM.get(attr, attr)
        if main in bins:
            programs[attr]["mainProgram"] = main

    # Which of a library's files are symlinks to another of its files: the
    # Nix side makes those links itself and imports only the files.
    for attr, entry in libs.items():
        lib_dir = entry.get("dir", LIB_DIR)
        for name in sorted(entry["files"]):
            path = os.path.join(lib_dir, name)
            if os.path.islink(at(path)):
                real = unrooted(os.path.realpath(at(path)))
                target = os.path.basename(real)
                if os.path.dirname(real) != lib_dir or target not in entry["files"]:
                    sys.exit(f"generate-host: {path} points outside {attr}'s files")
                entry.setdefault("symlinks", {})[name] = target
    for attr, spec in programs.items():
        for b in spec["bins"]:
            if os.path.islink(at(os.path.join(BIN_DIR, b))):
                sys.exit(f"generate-host: {BIN_DIR}/{b} of {attr} is a symlink")

    # A tool's libraries by soname, found as the loader would (its own NEEDED
    # entries and theirs in turn), and the loader itself.
    tools = {}
    for attr, binary in TOOLS.items():
        path = os.path.join(BIN_DIR, binary)
        found = {INTERPRETER: unrooted(os.path.realpath(at(os.path.join(LIB_DIR, INTERPRETER))))}
        todo = needed(path)
        while todo:
            soname = todo.pop()
            if soname in found:
                continue
            lib = unrooted(os.path.realpath(at(os.path.join(LIB_DIR, soname))))
            if not os.path.exists(at(lib)):
                sys.exit(f"generate-host: {binary} needs {soname}, which is not in {LIB_DIR}")
            found[soname] = lib
            todo.extend(needed(lib))
        tools[attr] = {"bin": binary, "libs": dict(sorted(found.items()))}

    out = {
        "libDir": LIB_DIR,
        "binDir": BIN_DIR,
        "interpreter": INTERPRETER,
        "libs": {k: dict({"files": sorted(v["files"]), "deps": sorted(v["deps"] - {k})},
                         **({"dir": v["dir"]} if "dir" in v else {}),
                         **({"symlinks": v["symlinks"]} if "symlinks" in v else {}))
                 for k, v in sorted(libs.items())},
        "programs": programs,
        "tools": tools,
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
