// Reads a gateway stream with Node's `eventsource` package (a spec-following EventSource),
// which reconnects by itself with Last-Event-ID. Prints {"ids": [...], "errors": N} when
// gateway.end arrives.
import { EventSource } from 'eventsource';

const url = process.argv[2];
const ids = [];
const data = [];
let errors = 0;
const es = new EventSource(url);
const record = (e) => { ids.push(e.lastEventId); data.push(e.data); };
es.addEventListener('message', record);
es.addEventListener('token', record);
es.addEventListener('gateway.end', (e) => {
  record(e);
  es.close();
  process.stdout.write(JSON.stringify({ ids, data, errors }) + '\n');
  process.exit(0);
});
es.addEventListener('error', () => { errors += 1; });
setTimeout(() => {
  process.stdout.write(JSON.stringify({ ids, data, errors, timeout: true }) + '\n');
  process.exit(1);
}, Number(process.argv[3] || 60000));
