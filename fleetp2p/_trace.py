import os, time
def t(msg):
    with open("/tmp/ttfb.log", "a") as f:
        f.write(f"{time.monotonic():.4f} {os.getpid()} {msg}\n")
