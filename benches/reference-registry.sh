# Sourced by the benchmarks: starts the CNCF reference registry (Debian's
# docker-registry, logging off, in-memory blob descriptor cache) on $REF,
# storing under $WORK, adds its pid to `pids` and waits until it answers.
reference_registry() {
  cat >"$WORK/ref.yml" <<YML
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $WORK/ref-data }, cache: { blobdescriptor: inmemory } }
http: { addr: $REF }
YML
  docker-registry serve "$WORK/ref.yml" >"$WORK/ref.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://$REF/v2/" >/dev/null && break; sleep 0.1; done
}
