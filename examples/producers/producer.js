// Publish one mmsend job with amqplib: confirmed, mandatory, persistent, messageId = job_id.
//
//   npm install amqplib
//   MMSEND_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f MMSEND_PREFIX=mmsend node producer.js
const amqp = require("amqplib");

const url = process.env.MMSEND_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f";
const prefix = process.env.MMSEND_PREFIX || "mmsend";
const job = {"v": 1, "job_id": "js-000001", "ad_account_id": "1234567890", "page_id": "9876543210",
             "message_id": "120210000000000000", "subscription_token": "<recipient>",
             "message": {"text": "Hi from Node"}, "campaign": "example"};

async function main() {
  const connection = await amqp.connect(url);
  const channel = await connection.createConfirmChannel();
  let returned = false; // mandatory: an unroutable job comes back (before its confirm)
  channel.on("return", () => { returned = true; });
  const now = new Date();
  await new Promise((resolve, reject) => channel.publish(prefix, `${prefix}.send`,
    Buffer.from(JSON.stringify(job)),
    { mandatory: true, persistent: true, contentType: "application/json", messageId: job.job_id,
      timestamp: Math.floor(now.getTime() / 1000), headers: { "x-mmsend-enqueued-at": now.toISOString() } },
    (err) => (err ? reject(err) : resolve())));
  await connection.close();
  if (returned) throw new Error(`${job.job_id} was unroutable: declare the topology (mmsend topology declare)`);
  console.log("published", job.job_id);
}
main().catch((e) => { console.error(e.message); process.exit(1); });
