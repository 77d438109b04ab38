# A nixpkgs-shaped package set built from files already on this machine, for
# tests and the offline demo: `import ./nix/offline-pkgs {}` is an attribute set
# of derivations, as `import <nixpkgs> {}` is.
#
# Real programs are the host's Debian binaries, each shared library in a store
# path of its own, patched (interpreter and RUNPATH) to load only from
# /nix/store, so they run in a container holding nothing but their closure.
# host.json (written by generate-host.py) says which files make up what.
# Synthetic packages exercise the image pipeline: closures larger than the layer
# budget, shared dependencies, a failing build and a slow one.
#
# For another system (aarch64-linux on an x86_64 host), the set wraps that
# system's Debian binaries instead, unpacked under a root of their own by
# scripts/offline-root.sh (which writes that root's host.json), and Nix runs
# its builders under emulation (`extra-platforms`, qemu-user through
# binfmt_misc). Roots are looked up in $NIXERY_OFFLINE_ROOTS/<system>, by
# default /var/cache/nixery-offline/<system>.
{ system ? builtins.currentSystem, ... }:
let
  foreign = system != builtins.currentSystem;
  rootsDir = let e = builtins.getEnv "NIXERY_OFFLINE_ROOTS"; in if e == "" then "/var/cache/nixery-offline" else e;
  # Put in front of every path host.json names ("" for this machine's own files).
  root =
    if !foreign then ""
    else if builtins.pathExists (/. + "${rootsDir}/${system}/host.json") then "${rootsDir}/${system}"
    else throw "nix/offline-pkgs has no ${system} packages on this machine: run scripts/offline-root.sh ${system} (it unpacks Debian's ${system} packages into ${rootsDir}/${system})";
  at = p: /. + "${root}${p}";
  host = builtins.fromJSON (builtins.readFile (if foreign then at "/host.json" else ./host.json));
  # host.json from before its `tools` were recorded cannot build the set.
  tools = host.tools or (throw "nix/offline-pkgs/host.json lists no build tools: it was written by an older generate-host.py; run `python3 nix/offline-pkgs/generate-host.py > nix/offline-pkgs/host.json` again");

  # Debian's static busybox is the only build tool. Busybox picks its applet
  # from argv[0], so the builder must be a file named `busybox`.
  busyboxDir = builtins.path {
    name = "busybox-static";
    path = at "/usr/bin";
    filter = p: t: baseNameOf p == "busybox";
  };

  mkDerivation = { name, script, ... }@args:
    derivation ((removeAttrs args [ "script" ]) // {
      inherit name system;
      builder = "${busyboxDir}/busybox";
      args = [ "sh" "-e" "-c" ''
        bb=${busyboxDir}/busybox
        $bb mkdir -p "$TMPDIR/.bin"
        $bb --install -s "$TMPDIR/.bin"
        export PATH="$TMPDIR/.bin"
        ${script}
      '' ];
    });


  # Host files, each imported on its own as "name=/nix/store/...-name" for
  # `copyFiles` (importing a directory through a filter would stat every entry
  # of it: over 50,000 stats per evaluation for /usr/lib alone).
  storeName = f: if builtins.match "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]*" f != null then f else "host-file";
  importFiles = dir: files:
    map (f: "${f}=${builtins.path { name = storeName f; path = at "${dir}/${f}"; }}") files;
  # Host text files by their contents: `builtins.readFile` follows symlinks,
  # where `builtins.path` stores a symlink itself (Nix 2.8) or its target
  # (2.26), so a file reached through a link, or mounted elsewhere in a
  # container, gives the same store path, and the same image digests.
  importText = name: path: builtins.toFile name (builtins.readFile path);
  # Where the host's /etc is. In the agent's container it is mounted apart
  # (deploy/components/offline: /host/etc), since the image's own
  # /etc/services is a link into the store, to the very path this set builds.
  hostEtc = let e = builtins.getEnv "NIXERY_OFFLINE_HOST_ETC"; in if e == "" then "/etc" else e;
  # Shell: copies a derivation's `files` into a directory, under their names.
  copyFiles = to: ''for f in $files; do cp "''${f#*=}" "${to}/''${f%%=*}"; done'';

  rpathOf = deps: builtins.concatStringsSep ":" (map (d: "${d}/lib") deps);

  # The host's patchelf with the libraries it loads, in the store: builders
  # never reach into /usr, so the set builds the same with Nix's sandbox on
  # (Debian 13's and NixOS's default) or off (Debian 12's). It patches a copy
  # of itself, run through the store's loader, to load only from $out/lib
  # (DT_RPATH, which unlike RUNPATH also serves its libraries' own needs).
  patchelfTool = let tool = tools.patchelf; in mkDerivation {
    name = "patchelf-host";
    bin = builtins.path { name = "patchelf"; path = at "${host.binDir}/${tool.bin}"; };
    files = builtins.attrValues (builtins.mapAttrs
      (soname: file: "${soname}=${builtins.path { name = storeName soname; path = at file; }}")
      tool.libs);
    # The copy that runs is in $out, not $TMPDIR, which may be mounted noexec
    # (a container's tmpfs /tmp).
    script = ''
      mkdir -p $out/bin $out/lib
      ${copyFiles "$out/lib"}
      cp $bin $out/bin/patchelf
      cp $bin $out/bin/.patchelf-unpatched
      chmod u+w $out/bin/patchelf
      $out/lib/${host.interpreter} --library-path $out/lib $out/bin/.patchelf-unpatched \
        --set-interpreter $out/lib/${host.interpreter} --force-rpath --set-rpath $out/lib $out/bin/patchelf
      rm $out/bin/.patchelf-unpatched
      $out/bin/patchelf --version >/dev/null
    '';
  };
  patchelf = "${patchelfTool}/bin/patchelf";

  libs = builtins.mapAttrs (name: spec:
    let
      deps = map (d: libs.${d}) spec.deps;
      symlinks = spec.symlinks or { };
    in
    mkDerivation {
      name = if name == "glibc" then "glibc-host" else "${name}-host";
      files = importFiles (spec.dir or host.libDir)
        (builtins.filter (f: !(builtins.hasAttr f symlinks)) spec.files);
      # name:target, as the host has them.
      links = builtins.attrValues (builtins.mapAttrs (l: t: "${l}:${t}") symlinks);
      rpath = rpathOf deps;
      script = ''
        mkdir -p $out/lib
        ${copyFiles "$out/lib"}
        for l in $links; do ln -s "''${l#*:}" "$out/lib/''${l%%:*}"; done
        chmod -R u+w $out/lib
        if [ -n "$rpath" ]; then
          for f in $out/lib/*; do
            [ -L "$f" ] || ${patchelf} --set-rpath "$rpath" "$f"
          done
        fi
      '';
    }) host.libs;

  # pname and meta.mainProgram as nixpkgs sets them (prepare-image.nix reads
  # them for an image's default command).
  # As in nixpkgs, `pkg.out` is the package itself, meta included.
  withMeta = name: spec: drv: let
    self = drv // {
      pname = name;
      meta = if spec ? mainProgram then { inherit (spec) mainProgram; } else { };
      out = self;
    };
  in self;

  # A program's other names (host.json `links`: name -> target in bin/).
  # Programs without any keep their derivations unchanged.
  linksOf = spec: if spec ? links then {
    links = builtins.concatStringsSep " " (builtins.attrValues (builtins.mapAttrs (l: t: "${l}:${t}") spec.links));
  } else { };

  programs = builtins.mapAttrs (name: spec: withMeta name spec (
    mkDerivation (linksOf spec // {
      name = "${name}-host";
      files = importFiles host.binDir spec.bins;
      interpreter = "${libs.glibc}/lib/${host.interpreter}";
      rpath = rpathOf (map (d: libs.${d}) spec.libs);
      script = ''
        mkdir -p $out/bin
        ${copyFiles "$out/bin"}
        chmod u+w $out/bin/*
        for f in $out/bin/*; do
          ${patchelf} --set-interpreter "$interpreter" --set-rpath "$rpath" "$f"
        done
        ${if spec ? links then ''for l in $links; do ln -s "''${l#*:}" "$out/bin/''${l%%:*}"; done; '' else ""}${if name == "bashInteractive" then "ln -s bash $out/bin/sh" else ""}
      '';
    }))) host.programs;

  # A package whose output is a few bytes plus references to `deps`.
  tiny = name: deps: mkDerivation {
    inherit name;
    deps = deps;
    script = ''
      mkdir -p $out/share/${name}
      echo "${name}" > $out/share/${name}/name
      for d in $deps; do echo "$d" >> $out/share/${name}/deps; done
    '';
  };

  # chain n: tiny packages chain-n -> chain-(n-1) -> ... -> chain-0.
  chain = prefix: n: deps:
    if n == 0 then tiny "${prefix}-0" deps
    else tiny "${prefix}-${toString n}" [ (chain prefix (n - 1) deps) ];

  sharedBase = chain "shared-base" 4 [ libs.glibc ];
  leaves = builtins.genList (i: tiny "wide-leaf-${toString i}" [ ]) 110;

  # largeApp's 32 parts (see there).
  largeParts = builtins.genList (p: mkDerivation {
    name = "large-app-part-${toString p}";
    part = toString p;
    script = ''
      bb=${busyboxDir}/busybox
      size=$(wc -c < $bb)
      pool=$TMPDIR/pool
      : > $pool
      k=0
      while [ $k -lt 8 ]; do
        r=$(( (part * 8 + k) % 256 ))
        if [ $r = 0 ]; then cat $bb >> $pool; else
          tr '\000-\377' "$(printf '\\%03o-\\377\\000-\\%03o' $r $((r - 1)))" < $bb >> $pool
        fi
        k=$((k + 1))
      done
      pad=$(( 16777216 - 8 * size ))
      if [ $pad -gt 0 ]; then
        seq $((part * 1000000)) $((part * 1000000 + 999999)) | head -c $pad >> $pool
      fi
      total=$(wc -c < $pool)
      mkdir -p $out/share/data
      exec 3< $pool
      s=$((part + 1)); left=$total; i=0
      while [ $left -gt 0 ]; do
        s=$(( (s * 1103515245 + 12345) % 2147483648 ))
        n=$(( (256 << ((s >> 16) % 10)) + (s >> 8) % 256 ))
        [ $n -gt $left ] && n=$left
        d=$out/share/data/$((i % 16))
        mkdir -p $d
        dd bs=$n count=1 of=$d/f$i 2>/dev/null <&3
        left=$((left - n)); i=$((i + 1))
      done
    '';
  }) 32;

  self = programs // {
    inherit (programs) bashInteractive coreutils hello curl jq gnugrep gnused findutils less moreutils nano;
    bash = programs.bashInteractive;
    glibc = libs.glibc;
    zlib = libs.libz;
    openssl = libs.libssl;
    hostLibs = libs;
    # For package sets built on this one (nix/agent-pkgs): the builder and
    # how host ELF files are made to load only from /nix/store.
    hostTools = {
      inherit mkDerivation patchelf rpathOf;
      interpreter = "${libs.glibc}/lib/${host.interpreter}";
    };

    busybox = mkDerivation {
      name = "busybox-host";
      script = ''
        mkdir -p $out/bin
        cp ${busyboxDir}/busybox $out/bin/busybox
        $out/bin/busybox --install -s $out/bin
        # --install writes absolute links to the store path: make them relative.
        for l in $out/bin/*; do [ -L "$l" ] && ln -sf busybox "$l"; done
      '';
    };

    cacert = mkDerivation {
      name = "cacert-host";
      bundle = importText "ca-certificates.crt" (/. + "${hostEtc}/ssl/certs/ca-certificates.crt");
      script = ''
        mkdir -p $out/etc/ssl/certs
        cp $bundle $out/etc/ssl/certs/ca-bundle.crt
      '';
    };

    iana-etc = mkDerivation {
      name = "iana-etc-host";
      files = map (f: "${f}=${importText f (/. + "${hostEtc}/${f}")}") [ "services" "protocols" ];
      script = ''
        mkdir -p $out/etc
        ${copyFiles "$out/etc"}
      '';
    };

    # --- synthetic packages for tests ---

    # 121 store paths in one closure: more than the default layer budget.
    deep = chain "deep" 120 [ ];
    # 111 store paths, all direct references of one package.
    wide = tiny "wide" leaves;
    # Two applications that share a five-path dependency chain and glibc.
    appA = tiny "app-a" [ sharedBase ];
    appB = tiny "app-b" [ sharedBase ];
    # Always fails, saying why.
    broken = mkDerivation {
      name = "broken";
      script = ''
        echo "broken: this package fails to build on purpose" >&2
        exit 1
      '';
    };
    # Takes 20 seconds. It is a new derivation on every evaluation (it depends
    # on the time), so it is never in the store already and is always slow.
    slow = mkDerivation {
      name = "slow";
      stamp = toString builtins.currentTime;
      script = ''
        echo "slow: sleeping for 20 seconds" >&2
        sleep 20
        mkdir -p $out && echo "$stamp" > $out/stamp
      '';
    };
    # hello, patched anew on every evaluation (it depends on the time): a
    # build that always runs patchelf on imported host files, so a test can
    # show the set builds inside Nix's sandbox however much the store holds.
    freshHello = mkDerivation {
      name = "fresh-hello";
      stamp = toString builtins.currentTime;
      files = importFiles host.binDir [ "hello" ];
      interpreter = "${libs.glibc}/lib/${host.interpreter}";
      rpath = rpathOf [ libs.glibc ];
      script = ''
        mkdir -p $out/bin
        ${copyFiles "$out/bin"}
        chmod u+w $out/bin/hello
        ${patchelf} --set-interpreter "$interpreter" --set-rpath "$rpath" $out/bin/hello
        echo "$stamp" > $out/stamp
      '';
    };
    # Runs a host program while it builds, as this set's builders once ran
    # the host's patchelf: it builds only with Nix's sandbox off, and with it
    # on fails the way such packages do ("sh: /usr/bin/hello: not found").
    # New on every evaluation, so it is never in the store already.
    hostProgram = mkDerivation {
      name = "host-program";
      stamp = toString builtins.currentTime;
      script = ''
        mkdir -p $out
        /usr/bin/hello > $out/greeting
      '';
    };
    # A sandbox's pause program for CRI runtimes (containerd's
    # `sandbox_image`): waits until it is signalled. Busybox sits outside bin/,
    # so the image's default command is `pause`.
    pause = withMeta "pause" { mainProgram = "pause"; } (mkDerivation {
      name = "pause";
      script = ''
        mkdir -p $out/bin $out/libexec
        cp ${busyboxDir}/busybox $out/libexec/busybox
        printf '%s\n' "#!$out/libexec/busybox sh" "trap 'exit 0' TERM INT" \
          "while :; do $out/libexec/busybox sleep 3600 & wait \$!; done" > $out/bin/pause
        chmod +x $out/bin/pause
      '';
    });
    # An application the size of a real one (a Python, JVM or CUDA closure):
    # 512 MiB in about 20,000 files of 0.25 to 128 KiB, spread over 32 store
    # paths of 16 MiB, and the busybox its program runs on. Deterministic: the
    # bytes are the host's static busybox (a real binary, so they compress as
    # binaries do: gzip keeps 52 %), byte-rotated 256 ways so no run repeats
    # (part p holds rotations p*8 to p*8+7), each part topped up to 16 MiB with
    # numbers from seq; files are cut from that stream at sizes an LCG picks.
    largeApp = withMeta "largeApp" { mainProgram = "large-app"; } (mkDerivation {
      name = "large-app";
      parts = largeParts;
      sh = "${self.busybox}/bin/sh";
      script = ''
        mkdir -p $out/bin $out/share/large-app
        n=0
        for p in $parts; do ln -s "$p" $out/share/large-app/part-$n; n=$((n + 1)); done
        printf '%s\n' "#!$sh" "echo \"large-app: $n parts of $out\"" > $out/bin/large-app
        chmod +x $out/bin/large-app
      '';
    });
    # 64 MiB of incompressible data: a layer that takes a while to pack.
    big = mkDerivation {
      name = "big";
      script = ''
        mkdir -p $out/share/big
        head -c 67108864 /dev/urandom > $out/share/big/data
      '';
    };
  };
in
self
