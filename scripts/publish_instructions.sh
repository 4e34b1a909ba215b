#!/usr/bin/env bash
# Instructions a single-event publish costs the gateway (all its threads, user space), counted by
# valgrind's callgrind, which does not move with what else the machine is doing.
#
#   scripts/publish_instructions.sh [memory|sqlite] [CONNECTIONS] [PUBLISHES]
#
# Runs the gateway under callgrind twice: CONNECTIONS keep-alive publishers post PUBLISHES single
# events each (one at a time, each answered before the next), then 3 x PUBLISHES; the difference in
# instructions over the difference in publishes is the cost of one publish, without start-up.
# Needs valgrind. Takes a few minutes (the gateway runs ~50 times slower under callgrind).
set -euo pipefail
backend=${1:-sqlite}
conns=${2:-32}
per=${3:-20}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}  # one with sse-gateway
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/load.py" <<'EOF'
import asyncio, sys
conns, per, port = map(int, sys.argv[1:4])

async def publisher(i: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for n in range(per):
        body = b'{"data":{"n":%d,"text":"token"}}' % n
        writer.write(b"POST /v1/sessions/ins-%d/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (i, len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 20"), head
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
    writer.close()

async def main() -> None:
    await asyncio.gather(*(publisher(i) for i in range(conns)))

asyncio.run(main())
EOF

run() {  # $1: publishes per connection -> instructions of the whole run
    rm -rf "$work/db"* "$work/cg".*
    local port
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
        "$python" -m sse_gateway serve --port "$port" --backend "$backend" --db "$work/db" >"$work/log" 2>&1 &
    local pid=$!
    for _ in $(seq 900); do
        "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/healthz')" 2>/dev/null && break
        sleep 0.2
    done
    "$python" "$work/load.py" "$conns" "$1" "$port"
    kill -INT "$pid"
    wait "$pid" || true
    cat "$work"/cg.out* | awk '/^summary:/ {n += $2} END {print n}'
}

a=$(run "$per")
b=$(run $((per * 3)))
echo "$backend: $(( (b - a) / (conns * per * 2) )) instructions per publish ($conns connections, $((conns * per * 2)) publishes)"
