# syntax=docker/dockerfile:1
# brainage BIDS App image: the app, a CUDA build of torch, and every weight, model card, template
# and atlas it reads at run time. Nothing is downloaded at run time.
#
# Build from the checkout. TORCH_VARIANT=cpu gives an image without the CUDA libraries.
#   docker build --build-arg VCS_REF=$(git rev-parse --short HEAD) \
#       --build-arg BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) -t brainage:0.1.0 .
# Run it as any uid on a read-only root file system. Only /out and /work are written;
# caches and temporary files go to the /tmp tmpfs.
#   docker run --rm --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" --gpus all \
#       -v /data/ds:/data:ro -v /data/out:/out -v /scratch/work:/work \
#       brainage:0.1.0 /data /out participant -w /work --nprocs 8 --omp-nthreads 4
#
# The install steps live in bin/install-brainage.sh. .ci/run runs that script in a fresh virtual
# environment, so this recipe is exercised even where Docker cannot build.
# tests/test_container.py runs the CLI under this file's run-time ENV, lints this file (hadolint)
# and checks the scripts (shellcheck).

# Pinned by exact tag. Add @sha256:<digest> from `docker buildx imagetools inspect` on a
# machine that can reach the registry.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cuda
WORKDIR /src
COPY bin/install-brainage.sh bin/
COPY constraints.txt setup.cfg pyproject.toml README.md ./
COPY bidsapp bidsapp
COPY training training
COPY models models
RUN python -m venv /opt/brainage \
 && PYTHON=/opt/brainage/bin/python bin/install-brainage.sh "${TORCH_VARIANT}"

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown

# The default user is brainage (uid/gid 1000), not root. Any uid given with `docker run -u` works
# too: everything in the image is world-readable, HOME is usable by every uid (go=u), and run-time
# writes go to the output and work directories and to /tmp.
RUN useradd --no-log-init --create-home --home-dir /home/brainage --uid 1000 --user-group brainage \
 && chmod -R go=u /home/brainage
COPY --from=build /opt/brainage /opt/brainage

# Run-time environment. tests/test_container.py runs the CLI with exactly these values.
# Caches point at /tmp: matplotlib's font cache, deno's code cache (bids-validator-deno), and numba
# and torch should a dependency use them. HOME is never written.
# TemplateFlow is not used; the templates come from nilearn's bundled files.
# The thread variables keep BLAS/OpenMP single-threaded by default. For the processes the app
# starts, --nprocs and --omp-nthreads set them.
ENV PATH=/opt/brainage/bin:${PATH} \
    HOME=/home/brainage \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    DENO_DIR=/tmp/.cache/deno \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    TORCH_HOME=/tmp/.cache/torch \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    IS_DOCKER_BRAINAGE=1 \
    BRAINAGE_CONTAINER_TYPE=docker \
    BRAINAGE_CONTAINER_TAG=brainage:${VERSION}

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["brainage"]

LABEL org.opencontainers.image.title="brainage" \
      org.opencontainers.image.description="BIDS App: brain age from T1-weighted MRI (ANTs/deepbet preprocessing, brain-age models, group statistics)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/brainage/brainage" \
      org.opencontainers.image.documentation="https://github.com/brainage/brainage#readme" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
