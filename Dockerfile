# One image for the project's services (writer load, cdc, projections).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY writer ./writer
COPY cdc ./cdc
COPY projections ./projections
COPY sql ./sql
# editable: the packages find sql/ beside them in /app
RUN pip install -e .
RUN useradd --system --home /app readside && mkdir -p /app/.local && chown readside /app/.local
USER readside
CMD ["python", "-m", "cdc", "run"]
