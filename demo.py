"""A short tour of corral on the local default backend: ``python -m corral.demo``."""

from __future__ import annotations

import time

import trio

import corral
from corral.protocol import ExecExited, ExecStdout


def _ms(start: float) -> str:
    return f"{(time.perf_counter() - start) * 1000:.1f} ms"


async def demo() -> None:
    async with corral.open_supervisor() as sup:
        t = time.perf_counter()
        sb = await sup.create("demo", env={"GREETING": "hello"})
        print(f"created sandbox {sb.name!r} ({sb.status.value}) in {_ms(t)}")

        t = time.perf_counter()
        out = await sb.exec("sh", ["-c", 'echo "$GREETING from $(hostname), uid $(id -u)"'])
        print(f"exec -> {out.stdout.decode().strip()!r} exit={out.exit_code} in {_ms(t)}")

        out = await sb.exec("python3", ["-c", "print(sum(range(10**6)))"])
        print(f"python3 in the sandbox -> {out.stdout.decode().strip()}")

        await sb.fs.write("/workspace/note.txt", b"written from the host\n")
        data = await sb.fs.read("/workspace/note.txt")
        print(f"fs round trip -> {data!r}")

        out = await sb.exec("sh", ["-c", "touch /usr/x 2>&1; cat /proc/net/dev | tail -n +3"])
        print("isolation: " + out.stdout.decode().strip().replace("\n", " | "))

        print("streaming:", end=" ", flush=True)
        async with sb.exec_stream("sh", ["-c", "for i in 1 2 3; do echo $i; done"]) as proc:
            async for event in proc:
                if isinstance(event, ExecStdout):
                    print(event.data.decode().replace("\n", " "), end="", flush=True)
                elif isinstance(event, ExecExited):
                    print(f"(exit {event.exit_code})")

        t = time.perf_counter()
        await sb.stop()
        print(f"stopped ({sb.status.value}) in {_ms(t)}")
        await sup.remove("demo")
    print("done: no sandbox left running")


def main() -> None:
    trio.run(demo)


if __name__ == "__main__":
    main()
