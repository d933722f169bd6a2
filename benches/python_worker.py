"""The reference worker for the pipeline bench (row Py): what a team would
write instead of mmsend, with aio-pika and aiohttp.

It consumes `<prefix>.send` with prefetch = concurrency, one task per
message (aio-pika runs every delivery's callback as its own task), parses
the JSON job, POSTs the body mmsend sends to
`{base}/{version}/act_{ad_account_id}/messages` with the bearer token, acks
on a 2xx carrying a `marketing_message_tracking_id`, and nacks with requeue
otherwise (a body that is not a JSON job is rejected, so it dead-letters).
No retry tiers, no gates, no pacing, no ledger: the cheapest worker that
still sends each job and acks it.

Configured by the environment (the bench sets it):

    MMSEND_AMQP_URL        amqp://guest:guest@127.0.0.1:5672/%2f
    MMSEND_PREFIX          the topology prefix (the queue is <prefix>.send)
    MMSEND_GRAPH_BASE_URL  e.g. http://127.0.0.1:8090
    MMSEND_GRAPH_VERSION   v24.0
    MMSEND_ACCESS_TOKEN    the bearer token
    MMSEND_CONCURRENCY     64

Runs until SIGTERM or SIGINT.
"""

import asyncio
import json
import os
import signal

import aio_pika
import aiohttp


def request_body(job):
    """The body of mmsend's Graph call (src/graph/client.rs)."""
    body = {
        "message_id": job["message_id"],
        "messenger_delivery_data": {"subscription_token": job["subscription_token"]},
    }
    if job.get("message") is not None:
        body["message"] = job["message"]
    if job.get("min_conversation_gap_seconds") is not None:
        body["min_conversation_gap_seconds"] = job["min_conversation_gap_seconds"]
    return body


async def main():
    amqp_url = os.environ.get("MMSEND_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue_name = os.environ["MMSEND_PREFIX"] + ".send"
    base = os.environ["MMSEND_GRAPH_BASE_URL"].rstrip("/")
    version = os.environ.get("MMSEND_GRAPH_VERSION", "v24.0").strip("/")
    token = os.environ["MMSEND_ACCESS_TOKEN"]
    concurrency = int(os.environ.get("MMSEND_CONCURRENCY", "64"))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=30, connect=10)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as http:
        connection = await aio_pika.connect_robust(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=concurrency)
            # the bench declared it (quorum, delivery limit, DLX): passive
            queue = await channel.get_queue(queue_name, ensure=True)

            async def on_message(message):
                try:
                    job = json.loads(message.body)
                    url = f"{base}/{version}/act_{job['ad_account_id']}/messages"
                    body = request_body(job)
                except (ValueError, KeyError, TypeError):
                    await message.reject(requeue=False)
                    return
                try:
                    async with http.post(url, json=body) as response:
                        answer = await response.json(content_type=None)
                        ok = (
                            200 <= response.status < 300
                            and isinstance(answer, dict)
                            and answer.get("success") is True
                            and bool(answer.get("marketing_message_tracking_id"))
                        )
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    ok = False
                if ok:
                    await message.ack()
                else:
                    await message.nack(requeue=True)

            await queue.consume(on_message)
            await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
