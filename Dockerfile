# One image for every process of check365-worker:
#   celery -A worker worker -Q check365   (the default command)
#   celery -A worker beat --schedule /tmp/celerybeat-schedule
#   check365-worker ...                    (enqueue, dead letters, the demo simulator)

# --- builder: turn the source tree into a wheel ---------------------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY worker ./worker
COPY check365_client ./check365_client
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: the wheel and its runtime dependencies, nothing else --------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="check365-worker" \
      org.opencontainers.image.description="Celery worker pool that watches Check365 bulk validation jobs and delivers signed webhooks" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheel is bind-mounted from the builder rather than copied, so it leaves no
# layer behind. Only the project's runtime dependencies are installed: no extra.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl

# An unprivileged user. Nothing in the image is writable by it except its home
# and /tmp (where beat keeps its schedule file).
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
            --shell /usr/sbin/nologin app
WORKDIR /home/app
# 10001 is `app`: numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# Prometheus metrics (METRICS_PORT; 0 disables them).
EXPOSE 9365

CMD ["celery", "-A", "worker", "worker", "-Q", "check365", "--loglevel=INFO"]
