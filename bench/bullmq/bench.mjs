// BullMQ's side of bench/: the same shapes as Celerity's and Celery's, on the same Redis, under a key
// prefix of the run's own. Driven by bench/src/bullmq.rs; each command prints one JSON line on stdout.
//
//   node bench.mjs worker  --queue Q --prefix P --concurrency 256   (prints {"ready":true}, runs until SIGTERM)
//   node bench.mjs add     --queue Q --prefix P --jobs N            (addBulk in batches of 1,000 while the
//                                                                    workers drain; every return value checked)
//   node bench.mjs latency --queue Q --prefix P --calls N           (N sequential add + waitUntilFinished)
//
// The processor returns x + y, as Celery's and Celerity's demo.add do.

import { Queue, QueueEvents, Worker } from 'bullmq';

const BATCH = 1000;
const STALL_MS = 60_000;

function options(argv) {
  const out = { redis: 'redis://127.0.0.1:6379/0' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    out[key] = argv[i + 1];
  }
  for (const need of ['queue', 'prefix']) {
    if (!out[need]) throw new Error(`--${need} is required`);
  }
  const url = new URL(out.redis);
  out.connection = {
    host: url.hostname,
    port: Number(url.port || 6379),
    db: Number(url.pathname.slice(1) || 0),
    maxRetriesPerRequest: null,
  };
  return out;
}

function count(value, name) {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer`);
  return n;
}

function print(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function worker(o) {
  const w = new Worker(o.queue, async (job) => job.data.x + job.data.y, {
    connection: o.connection,
    prefix: o.prefix,
    concurrency: count(o.concurrency ?? '256', 'concurrency'),
  });
  w.on('error', (e) => process.stderr.write(`bullmq worker: ${e}\n`));
  await w.waitUntilReady();
  print({ ready: true });
  await new Promise((resolve) => {
    process.once('SIGTERM', resolve);
    process.once('SIGINT', resolve);
  });
  await w.close();
}

async function add(o) {
  const n = count(o.jobs, 'jobs');
  const queue = new Queue(o.queue, { connection: o.connection, prefix: o.prefix });
  await queue.waitUntilReady();
  try {
    const first = Date.now();
    for (let i = 0; i < n; i += BATCH) {
      const jobs = [];
      for (let k = i; k < Math.min(i + BATCH, n); k++) {
        jobs.push({ name: 'add', data: { x: k, y: k } });
      }
      await queue.addBulk(jobs);
    }
    const enqueued = Date.now();
    await waitCompleted(queue, n);
    const last = await checkResults(queue, n);
    await queue.clean(0, n + BATCH, 'completed');
    print({
      enqueue: n / Math.max(enqueued - first, 1) * 1000,
      drain: n / Math.max(last - first, 1) * 1000,
      seconds: (last - first) / 1000,
    });
  } finally {
    await queue.close();
  }
}

// Polls the completed count until it reaches n; fails when a job failed or nothing moved for STALL_MS.
async function waitCompleted(queue, n) {
  let seen = -1;
  let since = Date.now();
  for (;;) {
    const c = await queue.getJobCounts('completed', 'failed');
    if (c.failed > 0) throw new Error(`${c.failed} jobs failed`);
    if (c.completed >= n) return;
    if (c.completed !== seen) {
      seen = c.completed;
      since = Date.now();
    } else if (Date.now() - since > STALL_MS) {
      throw new Error(`stalled at ${seen} of ${n} completed`);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

// Every completed job's return value is x + y and every i in 0..n came back once; returns the latest
// finishedOn (ms), the end of the drain as the workers recorded it.
async function checkResults(queue, n) {
  const seen = new Uint8Array(n);
  let last = 0;
  for (let start = 0; start < n; start += BATCH) {
    const jobs = await queue.getJobs(['completed'], start, start + BATCH - 1, true);
    for (const job of jobs) {
      const { x, y } = job.data;
      if (job.returnvalue !== x + y) {
        throw new Error(`job ${job.id}: returned ${job.returnvalue}, expected ${x + y}`);
      }
      if (!Number.isInteger(x) || x < 0 || x >= n || seen[x]) {
        throw new Error(`job ${job.id}: unexpected or repeated x = ${x}`);
      }
      seen[x] = 1;
      last = Math.max(last, job.finishedOn ?? 0);
    }
  }
  const missing = seen.indexOf(0);
  if (missing >= 0) throw new Error(`no result for job ${missing}`);
  return last;
}

async function latency(o) {
  const calls = count(o.calls, 'calls');
  const queue = new Queue(o.queue, { connection: o.connection, prefix: o.prefix });
  const events = new QueueEvents(o.queue, { connection: o.connection, prefix: o.prefix });
  await Promise.all([queue.waitUntilReady(), events.waitUntilReady()]);
  try {
    const ms = [];
    for (let i = 0; i < calls; i++) {
      const t = process.hrtime.bigint();
      const job = await queue.add('add', { x: i, y: i });
      const r = await job.waitUntilFinished(events, 10_000);
      ms.push(Number(process.hrtime.bigint() - t) / 1e6);
      if (r !== 2 * i) throw new Error(`call ${i}: returned ${r}, expected ${2 * i}`);
    }
    await queue.clean(0, calls + BATCH, 'completed');
    print({ ms });
  } finally {
    await events.close();
    await queue.close();
  }
}

const [cmd, ...rest] = process.argv.slice(2);
const commands = { worker, add, latency };
try {
  if (!commands[cmd]) throw new Error(`unknown command ${cmd}: worker | add | latency`);
  await commands[cmd](options(rest));
  process.exit(0);
} catch (e) {
  process.stderr.write(`bullmq bench: ${e?.stack ?? e}\n`);
  process.exit(1);
}
