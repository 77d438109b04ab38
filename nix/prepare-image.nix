# Resolves an image's package list against a package source, as data.
#
# Called by nixery (src/nix.rs) with every input passed as a string argument:
#   nix-instantiate --eval --strict --json --read-write-mode nix/prepare-image.nix \
#     --argstr srcType path|git|channel --argstr srcArgs JSON \
#     --argstr packages '["curl","python3Packages.requests"]' --argstr system x86_64-linux
# and answers { unknown = [names]; drvs = [drv paths]; outs = [output paths]; }.
# Package names are looked up as attribute paths; none is ever evaluated as Nix
# code, and a name that does not exist is reported, not thrown.
{ srcType, srcArgs, packages, system ? builtins.currentSystem }:
let
  args = builtins.fromJSON srcArgs;

  source =
    if srcType == "path" then args.path
    else if srcType == "git" then
      builtins.fetchGit ({ inherit (args) url; } // (if args ? rev then { inherit (args) rev; } else { inherit (args) ref; }))
    else if srcType == "channel" then builtins.fetchTarball args.url
    else throw "prepare-image.nix: unknown srcType '${srcType}'";

  pkgs = import source { inherit system; };

  splitAttrPath = name: builtins.filter builtins.isString (builtins.split "\\." name);

  # Walks an attribute path; null when any step is missing or fails to evaluate.
  lookup = name: builtins.foldl'
    (acc: part:
      if acc != null && builtins.isAttrs acc && builtins.hasAttr part acc then
        let v = builtins.tryEval (builtins.getAttr part acc); in
        if v.success then v.value else null
      else null)
    pkgs
    (splitAttrPath name);

  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";

  resolved = map (name: { inherit name; value = lookup name; }) (builtins.fromJSON packages);
  unknown = map (r: r.name) (builtins.filter (r: !(isDerivation r.value)) resolved);
  contents = map (r: r.value) (builtins.filter (r: isDerivation r.value) resolved);
in
{
  inherit unknown;
  drvs = if unknown == [ ] then map (d: d.drvPath) contents else [ ];
  outs = if unknown == [ ] then map (d: d.outPath) contents else [ ];
}
