# chatops-agent: one process runs every configured channel plus /healthz, /readyz and /metrics.
# Build: docker build -t chatops-agent .      Run: see README, section Deploy.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY bot bot
COPY tools tools
COPY storage storage
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt '.[postgres]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home chatops
COPY --from=build /install /usr/local
WORKDIR /data
USER chatops
ENV PYTHONUNBUFFERED=1 \
    CHATOPS_HOST=0.0.0.0 \
    CHATOPS_PORT=3000 \
    CHATOPS_LOG_FORMAT=json \
    DATABASE_URL=sqlite:////data/chatops.db
EXPOSE 3000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHATOPS_PORT', '3000'), timeout=4)"]
# SIGTERM (docker stop) ends the process within 10 s, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatops"]
CMD ["serve"]
