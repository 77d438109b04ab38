# Your own software as an image: a flake whose package nixery builds and
# serves. A NixImage names it (examples/flake-image.yaml):
#   spec.source.flake: git+https://git.example.com/you/hello-app?ref=main
#   spec.contents: [ hello-app ]
# or an ad-hoc registry serves it: `nixery serve --pkgs-flake <reference>`,
# then `docker pull HOST/hello-app`.
#
# Commit flake.lock (`nix flake lock`): nixery builds what it locks.
{
  description = "hello-app: a small program that nixery builds into an image";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: builtins.listToAttrs
        (map (system: { name = system; value = f system; }) systems);

      # The program: hello-app.sh with the commit it was built from. Built
      # with Nix's own `derivation` and nixpkgs' bash and coreutils, so it
      # needs no compiler; a real program would use stdenv.mkDerivation,
      # buildGoModule, rustPlatform.buildRustPackage…
      helloApp = system:
        let pkgs = nixpkgs.legacyPackages.${system}; in
        derivation {
          name = "hello-app";
          inherit system;
          version = self.shortRev or "dirty";
          builder = "${pkgs.bash}/bin/bash";
          coreutils = pkgs.coreutils;
          shell = pkgs.bash;
          src = ./hello-app.sh;
          args = [ "-c" ''
            export PATH=$coreutils/bin
            mkdir -p $out/bin
            {
              echo "#!$shell/bin/bash"
              echo "export PATH=$coreutils/bin"
              echo "REVISION=$version"
              cat $src
            } > $out/bin/hello-app
            chmod +x $out/bin/hello-app
          '' ];
        } // {
          # What an image of this package runs by default.
          meta.mainProgram = "hello-app";
        };
    in
    {
      packages = forAllSystems (system: rec {
        hello-app = helloApp system;
        default = hello-app;
      });
      # nixpkgs' packages too, so an image can add them by name
      # (`contents: [ hello-app, bash, coreutils ]`).
      legacyPackages = forAllSystems (system: nixpkgs.legacyPackages.${system});
    };
}
