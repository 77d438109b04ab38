# The offline package set as a flake, so a flake can take it as its nixpkgs
# input (`inputs.nixpkgs.url = "path:.../nix/offline-pkgs"`) and use it as
# it would use nixpkgs: `nixpkgs.legacyPackages.${system}.bash`. The set
# reads this machine's binaries, which pure evaluation forbids: evaluate it
# with `pure-eval = false` (tests/flake.rs does, saying why).
{
  description = "nixery's offline package set (host binaries in the Nix store)";
  outputs = { self }: {
    legacyPackages = builtins.listToAttrs (map
      (system: { name = system; value = import ./. { inherit system; }; })
      [ "x86_64-linux" "aarch64-linux" ]);
  };
}
