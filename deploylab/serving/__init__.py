"""Serving the course's model: one package for every server and what they share.

What every server shares:

- :mod:`~deploylab.serving.protocol` -- the wire protocol: input limits, decoding and validation of a
  request body (every failure a 4xx with a message), the JSON answer;
- :mod:`~deploylab.serving.processes` -- starting a server process and stopping it leaving nothing
  behind, one exit registry for a notebook kernel that goes away;
- :mod:`~deploylab.serving.api` -- the authenticated HTTP client and the Prometheus metrics parser;
- :mod:`~deploylab.serving.batching_policy` -- the one batching policy of every server that batches;
- :mod:`~deploylab.serving.load` and :mod:`~deploylab.serving.corpus` -- load runs, a worker killed
  under load, served parity, and the corpus of bad requests.

One module per server:

- :mod:`~deploylab.serving.torchserve` -- TorchServe with the custom handler (lesson 05);
- :mod:`~deploylab.serving.engine`, :mod:`~deploylab.serving.docker_build`, :mod:`~deploylab.serving.container`
  -- the Docker engine, the serving image and its container (lesson 06);
- :mod:`~deploylab.serving.asgi` -- the custom ASGI server with micro-batching (lesson 07);
- :mod:`~deploylab.serving.serverless` -- the same model as a cloud function (lesson 07).

Nothing is imported here, so that a server imports only what it needs (the serverless function's
cold start counts every import).
"""
