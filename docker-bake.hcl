# How each service's image is built: one target per service, from the one Dockerfile.
# By hand:     docker buildx bake gateway            (or: docker buildx bake, for both)
# In CI:       the images workflow bakes one target per job and adds what needs a registry and
#              GitHub: push to GHCR, SBOM and provenance attestations, a cache per service
# Elsewhere:   compose/compose.yaml builds with the same arguments, and .ci/images builds
#              these targets with podman (scripts/lib/bake.py reads this file); a check fails
#              when they differ.

variable "REGISTRY" {
  default = "ghcr.io/stackline/stackline"
}

# The image tag: the full commit SHA in CI, `dev` by hand.
variable "TAG" {
  default = "dev"
}

variable "REVISION" {
  default = "unknown"
}

variable "VERSION" {
  default = "0.1.0"
}

group "default" {
  targets = ["gateway", "data-service"]
}

target "_service" {
  context    = "."
  dockerfile = "services/Dockerfile"
  args = {
    REVISION = "${REVISION}"
    VERSION  = "${VERSION}"
  }
}

target "gateway" {
  inherits = ["_service"]
  args = {
    SERVICE = "gateway"
    PORTS   = "8080 9080"
  }
  tags = ["${REGISTRY}/gateway:${TAG}"]
}

target "data-service" {
  inherits = ["_service"]
  args = {
    SERVICE = "data-service"
    PORTS   = "8081"
  }
  tags = ["${REGISTRY}/data-service:${TAG}"]
}
