# Resolves an image's package list against a package source, as data.
#
# Called by nixery (src/nix/mod.rs) with every input passed as a string argument:
#   nix-instantiate --eval --strict --json nix/prepare-image.nix \
#     --argstr srcType path|git|channel|flake --argstr srcArgs JSON \
#     --argstr packages '["curl","python3Packages.requests"]' --argstr system x86_64-linux
# Read-only, this computes the paths without writing anything to the store;
# only when some output is missing is it run again with --read-write-mode, which
# writes the derivations that nix-store --realise then builds.
# and answers
#   { unknown = [names]; drvs = [drv paths]; outs = [output paths];
#     resolved = [{ name; attr; out; program; version; licenses; }]; }
# Package names are looked up as attribute paths; none is ever evaluated as Nix
# code, and a name that does not exist is reported, not thrown.
#
# As in Nixery, a top-level name that does not exist exactly is looked up
# case-insensitively (registry clients refuse uppercase repository names, so
# `bashinteractive` must find `bashInteractive`); nested sets stay exact.
# Only builtins are used, so this works with every Nix 2.x and Lix; a flake
# source (`builtins.getFlake` of a locked reference) needs the `flakes`
# experimental feature, which nixery turns on for those calls alone.
#
# A flake's names are looked up as `nix build FLAKE#NAME` looks them up:
# `packages.<system>.NAME`, then `legacyPackages.<system>.NAME` (through which
# a flake that re-exports nixpkgs keeps every nixpkgs attribute path valid).
{ srcType, srcArgs, packages, system ? builtins.currentSystem }:
let
  args = builtins.fromJSON srcArgs;

  source =
    if srcType == "path" then args.path
    else if srcType == "git" then
      builtins.fetchGit ({ inherit (args) url; } // (if args ? rev then { inherit (args) rev; } else { inherit (args) ref; }))
    # A pinned channel names the sha256 of its unpacked contents.
    else if srcType == "channel" then
      builtins.fetchTarball (if args ? sha256 then { inherit (args) url sha256; } else args.url)
    # A flake is evaluated as Nix evaluates it (pure, by default), so its
    # reference must be locked: nixery resolves it first (nix flake metadata).
    else if srcType == "flake" then builtins.getFlake args.ref
    else throw "prepare-image.nix: unknown srcType '${srcType}'";

  # The attribute sets names are looked up in, first match wins.
  roots =
    if srcType == "flake" then
      builtins.filter builtins.isAttrs [
        ((source.packages or { }).${system} or null)
        ((source.legacyPackages or { }).${system} or null)
      ]
    else [ (import source { inherit system; }) ];

  splitAttrPath = name: builtins.filter builtins.isString (builtins.split "\\." name);

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # The top-level attribute a name means in `pkgs`: itself, else the first
  # (sorted) name equal to it ignoring case, else null. attrNames is only
  # listed on a miss.
  topLevel = pkgs: name:
    if builtins.hasAttr name pkgs then name
    else
      let matches = builtins.filter (n: toLower n == toLower name) (builtins.attrNames pkgs);
      in if matches == [ ] then null else builtins.head matches;

  # Walks an attribute path; null when any step is missing or fails to evaluate.
  walk = pkgs: parts: builtins.foldl'
    (acc: part:
      if acc != null && builtins.isAttrs acc && builtins.hasAttr part acc then
        let v = builtins.tryEval (builtins.getAttr part acc); in
        if v.success then v.value else null
      else null)
    pkgs
    parts;

  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";

  # The value fully evaluated, or the fallback if that throws.
  strictOr = fallback: v:
    let t = builtins.tryEval (builtins.deepSeq v v); in
    if t.success && (builtins.isString t.value || builtins.isList t.value) then t.value else fallback;

  # meta.license is a license, a list of them, or a string: SPDX ids where
  # nixpkgs has them, else short names.
  licenseNames = l:
    let
      one = x: if builtins.isString x then x
        else if builtins.isAttrs x then (x.spdxId or x.shortName or null)
        else null;
      all = if builtins.isList l then l else [ l ];
    in builtins.filter builtins.isString (map one all);

  # A name in one root: its canonical attribute path and value.
  lookIn = parts: pkgs:
    let
      first = topLevel pkgs (builtins.head parts);
      canonical = [ first ] ++ builtins.tail parts;
    in
    if first == null then null
    else { attr = builtins.concatStringsSep "." canonical; value = walk pkgs canonical; };

  resolve = name:
    let
      parts = splitAttrPath name;
      tries = builtins.filter (t: t != null) (map (lookIn parts) roots);
      hits = builtins.filter (t: isDerivation t.value) tries;
      hit = if hits != [ ] then builtins.head hits
        else if tries != [ ] then builtins.head tries
        else { attr = null; value = null; };
      value = hit.value;
      ok = isDerivation value;
    in
    {
      inherit name ok;
      inherit (hit) attr;
      drv = if ok then value.drvPath else null;
      out = if ok then value.outPath else null;
      # The program a single-package image runs by default, as nixpkgs names it.
      program = if ok then (value.meta.mainProgram or value.pname or null) else null;
      # For the image's SBOM: what nixpkgs says of the package, where it says
      # it and it evaluates (a broken meta never fails an image).
      version = if ok then strictOr null (value.version or null) else null;
      licenses = if ok then strictOr [ ] (licenseNames (value.meta.license or [ ])) else [ ];
    };

  results = map resolve (builtins.fromJSON packages);
  unknown = map (r: r.name) (builtins.filter (r: !r.ok) results);
  found = builtins.filter (r: r.ok) results;
in
{
  inherit unknown;
  drvs = if unknown == [ ] then map (r: r.drv) found else [ ];
  outs = if unknown == [ ] then map (r: r.out) found else [ ];
  resolved = if unknown == [ ] then map (r: { inherit (r) name attr out program version licenses; }) found else [ ];
}
