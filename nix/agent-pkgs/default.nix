# The agent image's packages on a machine without nixpkgs: the offline
# package set (../offline-pkgs) plus the nixery binary built here and the
# host's Nix. `scripts/agent-image.sh` packs them with `nixery build`:
#
#   nixery build --pkgs-path nix/agent-pkgs nixery-agent/nixery-agent-install \
#     --entrypoint /bin/nixery --cmd agent ... --output nixery-agent.tar
#
# The layout is agent-image.nix's (the path with real nixpkgs): /bin/nixery as
# entrypoint, Nix and a shell in /bin, /etc/nix/nix.conf, and
# /bin/install-into-host-store for the DaemonSet's init container.
#
# The binary is $NIXERY_AGENT_BINARY, else target/release/nixery of this
# checkout (read at evaluation time, which nixery's evaluation allows).
{ system ? builtins.currentSystem, ... }:
let
  pkgs = import ../offline-pkgs { inherit system; };
  inherit (pkgs.hostTools) mkDerivation patchelf rpathOf interpreter;

  binaryPath =
    let fromEnv = builtins.getEnv "NIXERY_AGENT_BINARY";
    in if fromEnv != "" then /. + fromEnv else ../../target/release/nixery;

  # The Rust binary needs glibc and libgcc_s only (checked below).
  nixery = mkDerivation {
    name = "nixery";
    src = builtins.path { name = "nixery-binary"; path = binaryPath; };
    inherit interpreter;
    rpath = rpathOf [ pkgs.glibc pkgs.hostLibs.libgcc_s ];
    script = ''
      mkdir -p $out/bin
      cp $src $out/bin/nixery
      chmod u+w $out/bin/nixery
      # Debug info is for perf on a developer's machine, not for nodes.
      if [ -x /usr/bin/strip ]; then /usr/bin/strip --strip-debug $out/bin/nixery; fi
      ${patchelf} --set-interpreter "$interpreter" --set-rpath "$rpath" $out/bin/nixery
      if "$interpreter" --list $out/bin/nixery | grep -q "not found"; then
        "$interpreter" --list $out/bin/nixery >&2
        echo "nixery: the binary needs a library this package does not provide" >&2
        exit 1
      fi
    '';
  };

  # Single-user Nix as root in a container: no build users, no sandbox. The
  # host Nix's build hook is /usr/libexec/nix/build-remote, which a container
  # does not have, and Nix 2.8 runs it for every build even with no remote
  # builders: point it at the same program (the nix binary by that name).
  nixConf = mkDerivation {
    name = "nixery-agent-nix-conf";
    nix = pkgs.nix;
    script = ''
      mkdir -p $out/etc/nix $out/libexec/nix
      ln -s $nix/bin/nix $out/libexec/nix/build-remote
      printf 'sandbox = false\nbuild-users-group =\nbuild-hook = %s\n' \
        $out/libexec/nix/build-remote > $out/etc/nix/nix.conf
    '';
  };

  # What the agent container runs, and what the init container copies into
  # the node's store (the agent mounts the node's /nix over the image's).
  agent = mkDerivation {
    name = "nixery-agent";
    parts = [ nixery pkgs.nix pkgs.bashInteractive pkgs.coreutils ];
    inherit nixConf;
    cacert = pkgs.cacert;
    script = ''
      mkdir -p $out/bin $out/etc/nix $out/etc/ssl/certs
      for p in $parts; do
        for b in $p/bin/*; do ln -sf "$b" $out/bin/; done
      done
      ln -s $nixConf/etc/nix/nix.conf $out/etc/nix/nix.conf
      ln -s $cacert/etc/ssl/certs/ca-bundle.crt $out/etc/ssl/certs/ca-bundle.crt
    '';
  };

  # The agent's closure with references, as `nix-store --register-validity`
  # reads it: the image carries store paths but no Nix database.
  registration = mkDerivation {
    name = "nixery-agent-registration";
    exportReferencesGraph = [ "graph" agent ];
    script = "cp graph $out";
  };

  install = mkDerivation {
    name = "nixery-agent-install";
    inherit agent registration;
    bash = pkgs.bashInteractive;
    nix = pkgs.nix;
    script = ''
      mkdir -p $out/bin
      cat > $out/bin/install-into-host-store <<EOF
      #!$bash/bin/bash
      # Copies the agent's closure into the node's store (mounted at \$1/nix),
      # registered as valid there, with a GC root. Run by the init container.
      set -eu
      root="\''${1:-/host}"
      $nix/bin/nix-store --register-validity < $registration
      $nix/bin/nix --extra-experimental-features nix-command \\
        copy --no-check-sigs --to "local?root=\$root" $agent
      mkdir -p "\$root/nix/var/nix/gcroots"
      ln -sfn $agent "\$root/nix/var/nix/gcroots/nixery-agent"
      # Nix links a new store's profiles root by the path it was reached by
      # (\$root/...); the node sees its store at /nix.
      case "\$(readlink "\$root/nix/var/nix/gcroots/profiles" || true)" in
        "\$root"/*) ln -sfn /nix/var/nix/profiles "\$root/nix/var/nix/gcroots/profiles" ;;
      esac
      echo "install-into-host-store: $agent is in \$root/nix/store"
      EOF
      chmod +x $out/bin/install-into-host-store
    '';
  };
in
pkgs // {
  inherit nixery;
  nixery-agent = agent;
  nixery-agent-install = install;
}
