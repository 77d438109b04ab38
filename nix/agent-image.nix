# The agent's own container image (nixery, Nix, and what Nix fetches with),
# built with real nixpkgs:
#   nix-build nix/agent-image.nix && docker load < result
# Every node mounts its host /nix over the image's, so the image carries
# /bin/install-into-host-store, which the DaemonSet's init container runs to
# copy this closure into the host store (with a GC root) first.
# Not built in CI: this machine cannot reach the Nix binary cache.
{ pkgs ? import <nixpkgs> { } }:
let
  nixery = pkgs.rustPlatform.buildRustPackage {
    pname = "nixery";
    version = "0.1.0";
    src = pkgs.lib.cleanSourceWith {
      src = ../.;
      filter = path: type: !(pkgs.lib.hasInfix "/target" path) && !(pkgs.lib.hasInfix "/state" path);
    };
    cargoLock.lockFile = ../Cargo.lock;
    # The tests need a Docker engine and a writable Nix store.
    doCheck = false;
  };

  runtime = pkgs.buildEnv {
    name = "nixery-agent-env";
    paths = [ nixery pkgs.nix pkgs.bashInteractive pkgs.coreutils pkgs.git pkgs.gnutar pkgs.gzip pkgs.cacert ];
  };

  install = pkgs.writeShellScriptBin "install-into-host-store" ''
    set -eu
    root="''${1:-/host}"
    ${pkgs.nix}/bin/nix --extra-experimental-features nix-command \
      copy --no-check-sigs --to "local?root=$root" ${runtime}
    mkdir -p "$root/nix/var/nix/gcroots"
    ln -sfn ${runtime} "$root/nix/var/nix/gcroots/nixery-agent"
  '';
in
pkgs.dockerTools.buildLayeredImage {
  name = "nixery-agent";
  tag = "latest";
  contents = [ runtime install ];
  extraCommands = ''
    mkdir -p tmp var/lib/nixery etc/nix
    chmod 1777 tmp
    echo "sandbox = false" > etc/nix/nix.conf
  '';
  config = {
    Entrypoint = [ "/bin/nixery" ];
    Cmd = [ "agent" ];
    Env = [
      "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
      "PATH=/bin"
    ];
    ExposedPorts = { "5000/tcp" = { }; };
    User = "0:0";
  };
}
