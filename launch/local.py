"""Start N processes of alexnet_jax on this machine as one multi-process job.

  python launch/local.py --processes=2 --devices_per_process=2 -- \\
      --config=configs/quickstart.py --workdir=/tmp/run --config.mesh.tower=2

Each process gets CPU devices of its own and joins the others through
jax.distributed at localhost, as hosts of a cluster would; its output lines
are prefixed with [index]. For tests and demos of multi-host behaviour.

The exit status is the first non-zero one among the processes, else 0. Once
one fails, the others have --grace_s seconds to stop by themselves (the
jax.distributed heartbeat tells them) before they are killed.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _relay(stream, prefix: str, out) -> None:
  for line in stream:
    out.write(prefix + line)
    out.flush()


def launch(processes: int, devices_per_process: int, main_args: list[str],
           grace_s: float) -> int:
  """Run the processes to the end; returns the job's exit status."""
  address = f'localhost:{_free_port()}'
  env = dict(os.environ, XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={devices_per_process}'))
  running, relays = [], []
  for index in range(processes):
    process = subprocess.Popen(
        [sys.executable, '-m', 'alexnet_jax.main', *main_args,
         f'--coordinator_address={address}',
         f'--num_processes={processes}', f'--process_id={index}'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running.append(process)
    for stream, out in ((process.stdout, sys.stdout),
                        (process.stderr, sys.stderr)):
      relay = threading.Thread(target=_relay,
                               args=(stream, f'[{index}] ', out))
      relay.start()
      relays.append(relay)
  failed_at = None
  while any(p.poll() is None for p in running):
    if failed_at is None and any(p.poll() for p in running):
      failed_at = time.monotonic()
    if failed_at is not None and time.monotonic() - failed_at > grace_s:
      for p in running:
        if p.poll() is None:
          print(f'launch: killing process {running.index(p)}, still running '
                f'{grace_s:.0f} s after another failed', file=sys.stderr)
          p.kill()
    time.sleep(0.1)
  for relay in relays:
    relay.join()
  return next((p.returncode for p in running if p.returncode), 0)


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      usage='%(prog)s [options] -- MAIN_ARGS')
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--grace_s', type=float, default=90.0)
  parser.add_argument('main_args', nargs=argparse.REMAINDER)
  args = parser.parse_args()
  for name in ('processes', 'devices_per_process'):
    if getattr(args, name) < 1:
      print(f'error: --{name}={getattr(args, name)}: give 1 or more',
            file=sys.stderr)
      sys.exit(2)
  main_args = args.main_args[1:] if args.main_args[:1] == ['--'] else (
      args.main_args)
  sys.exit(launch(args.processes, args.devices_per_process, main_args,
                  args.grace_s))


if __name__ == '__main__':
  main()
