# Sourced by the image scripts (make-busybox-image.sh, make-pause-image.sh): packs a root
# filesystem directory into a reproducible single-layer OCI image layout tarball that
#   ctr image import OUT.tar
# names REF (the index's org.opencontainers.image.ref.name). No registry involved.
# oci_layout_tar ROOTFS_DIR CONFIG_JSON REF OUT.tar WORK_DIR
#   CONFIG_JSON: the image config's "config" object, e.g. {"Entrypoint":["/pause"]}.
oci_layout_tar() {
  local root=$1 config=$2 ref=$3 out=$4 work=$5
  mkdir -p "$work/oci/blobs/sha256"
  local blobs=$work/oci/blobs/sha256
  # Reproducible layer: sorted names, fixed owner and mtime.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2024-01-01 00:00:00' \
      -C "$root" -cf "$work/layer.tar" .
  local layer_sha layer_size config_sha config_size manifest_sha manifest_size
  layer_sha=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$work/layer.tar")
  mv "$work/layer.tar" "$blobs/$layer_sha"
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"joey scripts/%s"}]}' \
    "$config" "$layer_sha" "$(basename "$0")" > "$work/config.json"
  config_sha=$(sha256sum "$work/config.json" | cut -d' ' -f1)
  config_size=$(stat -c %s "$work/config.json")
  mv "$work/config.json" "$blobs/$config_sha"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config_sha" "$config_size" "$layer_sha" "$layer_size" > "$work/manifest.json"
  manifest_sha=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
  manifest_size=$(stat -c %s "$work/manifest.json")
  mv "$work/manifest.json" "$blobs/$manifest_sha"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest_sha" "$manifest_size" "$ref" > "$work/oci/index.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2024-01-01 00:00:00' -C "$work/oci" -cf "$out" oci-layout index.json blobs
}
