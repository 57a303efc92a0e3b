"""The registry front: the OCI Distribution pull API that containerd, podman and skopeo talk to."""
