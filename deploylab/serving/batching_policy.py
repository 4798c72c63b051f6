"""The kit's one dynamic-batching policy, shared by every server that batches (issue 31: like with like).

Up to :data:`MAX_BATCH` requests in one model call, waiting at most :data:`MAX_WAIT_MS` for more
once a batch has begun: TorchServe's ``batchSize`` / ``maxBatchDelay`` (lessons 05-07, the container
of 06, ``deploylab serve``), the custom server's micro-batcher (07, 09), LitServe's ``max_batch_size``
/ ``batch_timeout`` and Ray Serve's ``@serve.batch`` (08). Comparing servers with different policies
would measure the policies, not the servers.

Two of them spell the numbers out, because lesson 08 prints their source (Ray Serve's decorator and
LitServe's API class); ``tests/test_scale_out.py`` checks that every server's default equals this policy.
"""

MAX_BATCH = 16  # requests per model call at most
MAX_WAIT_MS = 5  # the longest a batch waits for more requests, in milliseconds
