"""Publish one mmsend job with pika: confirmed, mandatory, persistent, message_id = job_id.

    pip install pika
    MMSEND_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f MMSEND_PREFIX=mmsend python3 producer.py
"""
import datetime, json, os
import pika

url = os.environ.get("MMSEND_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
prefix = os.environ.get("MMSEND_PREFIX", "mmsend")
job = {"v": 1, "job_id": "py-000001", "ad_account_id": "1234567890", "page_id": "9876543210",
       "message_id": "120210000000000000", "subscription_token": "<recipient>",
       "message": {"text": "Hi from Python"}, "campaign": "example"}

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()  # basic_publish now waits for the broker's confirm
now = datetime.datetime.now(datetime.timezone.utc)
channel.basic_publish(  # raises UnroutableError (mandatory) or NackError: nothing vanishes
    exchange=prefix, routing_key=prefix + ".send", body=json.dumps(job), mandatory=True,
    properties=pika.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id=job["job_id"],
        timestamp=int(now.timestamp()),
        headers={"x-mmsend-enqueued-at": now.isoformat(timespec="milliseconds")}))
print("published", job["job_id"])
connection.close()
