# brainage BIDS App image: everything needed at run time is inside (no network at run time).
# Build:  docker build -t brainage .
# Run:    docker run --rm -v /data:/data:ro -v /out:/out brainage /data /out participant
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    NIPYPE_NO_ET=1 \
    HOME=/home/brainage \
    MPLCONFIGDIR=/home/brainage/.config/matplotlib \
    IS_DOCKER_BRAINAGE=1

RUN useradd --create-home --home-dir /home/brainage brainage

WORKDIR /src
COPY constraints.txt setup.cfg pyproject.toml README.md ./
COPY bidsapp ./bidsapp
COPY bin ./bin
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install -c constraints.txt . \
 && python -c "import bidsapp, deepbet, ants, nilearn.datasets as d; print(d.MNI152_FILE_PATH)" \
 && chmod -R go=u /home/brainage

WORKDIR /tmp
ENTRYPOINT ["brainage"]

LABEL org.opencontainers.image.title="brainage" \
      org.opencontainers.image.description="BIDS App: brain age from T1-weighted MRI" \
      org.opencontainers.image.licenses="Apache-2.0"
