# sentinel-node in a container: every role (bootstrap, join --role ..., status, demo) is `docker run IMAGE <command>`.
#   docker build -t sentinel-node .
#   docker run --rm sentinel-node demo              # the whole swarm inside one container
#   docker compose -f bootstrap/docker-compose.yml up    # bootstrap + validator + 2 stages + trainer
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

WORKDIR /opt/sentinel

# torch first, the CPU build: an unpinned torch from PyPI would pull a multi-GB CUDA build. For a GPU image, start
# from an nvidia/cuda base and install the CUDA build instead (torch>=2.2,<2.15 is accepted).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    || pip install torch==2.13.0

# the project (hivemind ships its p2pd binary in its wheel; nothing else to build)
COPY pyproject.toml README.md ./
COPY node ./node
COPY sentinel ./sentinel
COPY swarm ./swarm
COPY bootstrap ./bootstrap
RUN pip install . && sentinel-node --help > /dev/null

# identities and state live in a volume; run as an unprivileged user
RUN useradd --create-home --uid 1000 sentinel && mkdir -p /keys /data && chown sentinel /keys /data
USER sentinel
VOLUME ["/keys", "/data"]
# the default libp2p port of `sentinel-node bootstrap` (publish it with -p 31337:31337 on a public bootstrap peer)
EXPOSE 31337

ENTRYPOINT ["sentinel-node"]
CMD ["--help"]
