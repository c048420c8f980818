#!/bin/sh
# One-shot set-up of the compose lab's controller home (idempotent): registry, signing key, the classes of
# deploy/profiles and the simulated devices, whose ids follow `edgefleet-agent simulate` (CLASS-00000, ...).
set -eu
DEVICES="${LAB_DEVICES:-20}"
CLASS="${LAB_CLASS:-rpi4}"
PROFILES="${LAB_PROFILES:-/opt/edgefleet/profiles}"
MARKER="${EDGEFLEET_HOME}/.lab-initialised"
# Where the devices read the controller's public key (a volume the simulated fleet mounts read-only).
TRUST="${LAB_TRUST_DIR:-/var/lib/edgefleet-trust}"
if [ -e "$MARKER" ]; then
  echo "lab already initialised ($MARKER)"
  exit 0
fi
edgefleet init
for profile in "$PROFILES"/*.toml; do
  name="$(basename "$profile" .toml)"
  edgefleet class add "$name" --profile "$profile"
done
ids="${EDGEFLEET_HOME}/lab-devices.csv"
echo "device_id" > "$ids"
i=0
while [ "$i" -lt "$DEVICES" ]; do
  printf '%s-%05d\n' "$CLASS" "$i" >> "$ids"
  i=$((i + 1))
done
edgefleet device register --class "$CLASS" --csv "$ids" --out "${EDGEFLEET_HOME}/lab-credentials.csv" > /dev/null
cp "${EDGEFLEET_HOME}/keys/controller.ed25519.pub" "$TRUST/controller.ed25519.pub"
chmod 0644 "$TRUST/controller.ed25519.pub"
touch "$MARKER"
echo "lab initialised: $DEVICES $CLASS devices registered"
