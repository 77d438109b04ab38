# The agent's own container image (nixery, Nix, and what Nix fetches with),
# built with real nixpkgs:
#   nix-build nix/agent-image.nix && docker load < result
# Every node mounts its host /nix over the image's, so the image carries
# /bin/install-into-host-store, which the DaemonSet's init container runs to
# copy this closure into the host store (with a GC root) first.
# Not built in CI: this machine cannot reach the Nix binary cache. Without
# nixpkgs, scripts/agent-image.sh makes the same layout from nix/agent-pkgs
# (tests/agent_image.rs runs that one as the DaemonSet does).
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
    # k8s-cri's build script compiles the CRI's protobuf files with protoc.
    nativeBuildInputs = [ pkgs.protobuf ];
    # The tests need a Docker engine and a writable Nix store.
    doCheck = false;
  };

  # The same nix.conf as nix/agent-pkgs: single-user root, no sandbox, and a
  # build hook the container has.
  nixConf = pkgs.writeTextDir "etc/nix/nix.conf" ''
    sandbox = false
    build-users-group =
    build-hook = ${pkgs.nix}/libexec/nix/build-remote
  '';

  runtime = pkgs.buildEnv {
    name = "nixery-agent-env";
    paths = [ nixery pkgs.nix pkgs.bashInteractive pkgs.coreutils pkgs.git pkgs.gnutar pkgs.gzip pkgs.cacert nixConf ];
  };

  # The image carries store paths but no Nix database: register them in the
  # image's own store first, then copy them into the node's.
  closure = pkgs.closureInfo { rootPaths = [ runtime ]; };

  install = pkgs.writeShellScriptBin "install-into-host-store" ''
    set -eu
    root="''${1:-/host}"
    ${pkgs.nix}/bin/nix-store --load-db < ${closure}/registration
    ${pkgs.nix}/bin/nix --extra-experimental-features nix-command \
      copy --no-check-sigs --to "local?root=$root" ${runtime}
    mkdir -p "$root/nix/var/nix/gcroots"
    ln -sfn ${runtime} "$root/nix/var/nix/gcroots/nixery-agent"
    case "$(readlink "$root/nix/var/nix/gcroots/profiles" || true)" in
      "$root"/*) ln -sfn /nix/var/nix/profiles "$root/nix/var/nix/gcroots/profiles" ;;
    esac
  '';
in
pkgs.dockerTools.buildLayeredImage {
  name = "nixery-agent";
  tag = "latest";
  contents = [ runtime install ];
  extraCommands = ''
    mkdir -p tmp var/lib/nixery
    chmod 1777 tmp
  '';
  config = {
    Entrypoint = [ "/bin/nixery" ];
    Cmd = [ "agent" ];
    # As scripts/agent-image.sh sets them.
    Env = [
      "PATH=/bin"
      "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
      "NIX_SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
      "XDG_CACHE_HOME=/var/lib/nixery/cache"
    ];
    ExposedPorts = { "5000/tcp" = { }; };
    User = "0:0";
  };
}
