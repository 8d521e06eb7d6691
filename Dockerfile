# inferq image: API and CPU workers. GPU images build llama.cpp with CUDA:
#   docker build --build-arg CMAKE_ARGS="-DGGML_CUDA=on" ...
FROM python:3.11-slim
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api api
COPY workers workers
COPY schemas schemas
COPY migrations migrations
COPY inferq inferq
RUN CMAKE_ARGS="$CMAKE_ARGS" pip install --no-cache-dir .
ENV INFERQ_MODELS_DIR=/models
EXPOSE 8080
CMD ["inferq", "api", "--host", "0.0.0.0"]
