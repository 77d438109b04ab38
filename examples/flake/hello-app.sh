# hello-app: what the image runs. Change it, commit, push: a NixImage that
# follows this flake's branch runs the new commit after the agents' cache TTL.
echo "Hello from hello-app at ${REVISION}!"
if [ $# -gt 0 ]; then
  echo "You said: $*"
fi
