"""A stuck multi-process run ends itself, and a restart resumes it to the uninterrupted run's params.

2 processes x 2 simulated CPU devices over loopback (gloo), DeepHebb (width 0.05) on the tiny tfds
dataset, tiny timeouts: process 1 stopped (SIGSTOP) so that process 0 waits in a collective forever,
then the watchdog's line (exit 75); SIGTERM to process 0 while it waits there, then the grace
period's line (exit 76); process 1 killed (SIGKILL), then process 0 ends within the heartbeat timeout.
After each, both processes restart on the same workdir, resume from the last complete checkpoint and
finish with the params of an uninterrupted 2-process run, bit for bit.
"""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import pytest

from ghl_jax.train import plots
from ghl_jax.train import validate
from ghl_jax.train.checkpoint import saved_steps
from ghl_jax.train.validate import ConfigError
from ghl_jax.train.watchdog import EXIT_SIGTERM, EXIT_STUCK, SigtermGuard, Watchdog
from test_fault_tolerance import flat_overrides, free_port, logged_steps, wait_for
from test_train import REPO, tiny_config

STEPS = 16
STEP_S = 12.0         # the watchdog's step limit in these tests (well under the heartbeat timeout)
GRACE_S = 5.0         # the SIGTERM grace period
HEARTBEAT_S = 60      # the distributed runtime's heartbeat timeout (a stopped peer: the watchdog ends it first)
RUNTIME_DEAD_PEER = 'Terminating process because the JAX distributed service detected fatal errors'


def config_for(tiny_tfds, **watchdog):
  config = tiny_config(*tiny_tfds, num_train_steps=STEPS, checkpoint_every_steps=2, eval_every_steps=4)
  config.watchdog.update({'heartbeat_s': HEARTBEAT_S, 'shutdown_s': 10, 'sigterm_grace_s': GRACE_S,
                          **watchdog})
  return config


def start_pair(config, workdirs, fault=''):
  """Both processes of a run over ``workdirs`` (trained one after the other); ``fault``: see
  ``distributed_worker.py``."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', PYTHONPATH=REPO,
             JAX_PLATFORMS='cpu', GHL_TEST_FAULT=fault)
  return [subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'distributed_worker.py'), str(i), '2',
                            str(port), os.pathsep.join(workdirs), json.dumps(flat_overrides(config))],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def stopped(process) -> bool:
  with open(f'/proc/{process.pid}/stat') as f:
    return f.read().rsplit(')', 1)[1].split()[0] == 'T'


def interrupted(workers, act=None):
  """Waits for process 1 to stop or die, calls ``act(workers)``, and returns process 0's exit code,
  its last line, the seconds from process 1's stop (or death) to process 0's exit, and both outputs
  (process 1's: what it printed before it stopped or died, for the failure messages)."""
  try:
    assert wait_for(lambda: workers[1].poll() is not None or stopped(workers[1]), workers[0], poll=0.05), \
        workers[0].communicate()[0][-3000:]
    began = time.time()
    if act is not None:
      act(workers)
    out = workers[0].communicate(timeout=120)[0]
    lines = [line for line in out.strip().splitlines() if not line.startswith('[Gloo]')]
    return workers[0].returncode, (lines or [''])[-1], time.time() - began, out + '\n' + ended(workers[1])
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
      w.communicate()


def ended(process) -> str:
  """How process 1 ended: stopped by its fault, or exited on its own (then its code and output)."""
  if process.poll() is None:
    return '[process 1 stopped by its fault]'
  return f'[process 1 exited with code {process.returncode} before process 0]\n' + process.communicate(timeout=30)[0][-2000:]


def resumes_from_last_checkpoint(output: str, last: int) -> bool:
  return (f'Resuming from step {last} of {STEPS}' if last else f'Starting from step 0 of {STEPS}') in output


def test_stuck_killed_and_terminated_peers_end_with_one_line_and_the_run_resumes_bit_for_bit(tiny_tfds, tmp_path):
  """1. Process 1 stops (SIGSTOP) before step 6: process 0's watchdog ends it (exit 75, one line).
  2. Restarted, process 1 stops before step 10 and process 0 gets SIGTERM while it waits in a
     collective: it exits within the grace period (exit 76, one line).
  3. Restarted, process 1 dies (SIGKILL) before step 14: process 0 exits, with the trainer's line
     (exit 75) where a collective fails, else when the runtime's heartbeat declares process 1 dead.
  4. Restarted, the run finishes. Each restart resumes from the last complete checkpoint, and the
     params equal those of an uninterrupted 2-process run (trained by the first start) bit for bit.
  """
  reference, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'run')
  watched = config_for(tiny_tfds, enabled=True, startup_s=300.0, restore_s=120.0, step_s=STEP_S, eval_s=60.0,
                       save_s=60.0, step_factor=0.0)
  unwatched = config_for(tiny_tfds)                           # the watchdog off: only SIGTERM's grace

  code, line, seconds, out = interrupted(start_pair(watched, [reference, workdir], fault='1:stop:6'))
  assert out.endswith('[process 1 stopped by its fault]'), out[-4000:]
  assert code == EXIT_STUCK, out[-3000:]
  assert line.startswith('watchdog: process 0 stuck in step at step ') and 'config.watchdog.step_s' in line, \
      out[-4000:]
  assert seconds < STEP_S + 10, seconds
  assert logged_steps(reference) == list(range(1, STEPS + 1))

  def terminate(workers):
    time.sleep(1.0)                              # process 0 waits in the step's collective by now
    workers[0].send_signal(signal.SIGTERM)

  last = max(saved_steps(workdir), default=0)
  workers = start_pair(unwatched, [workdir], fault='1:stop:10')
  code, line, seconds, out = interrupted(workers, terminate)
  assert resumes_from_last_checkpoint(out, last), out[-3000:]
  assert code == EXIT_SIGTERM, out[-3000:]
  assert line.startswith(f'SIGTERM: process 0 could not stop within {GRACE_S:g} s') and \
      'no checkpoint was written for the current interval' in line, line
  assert seconds < 1.0 + GRACE_S + 5.0, seconds

  last = max(saved_steps(workdir), default=0)
  code, line, seconds, out = interrupted(start_pair(unwatched, [workdir], fault='1:kill:14'))
  assert resumes_from_last_checkpoint(out, last), out[-3000:]
  if code == EXIT_STUCK:                       # a collective failed first: the trainer's line
    assert line.startswith('process 0: ') and 'a peer process is gone' in line, line
  else:                                        # the runtime's heartbeat declared process 1 dead
    assert code != 0 and RUNTIME_DEAD_PEER in out, out[-3000:]
  assert seconds < HEARTBEAT_S + 15, seconds

  last = max(saved_steps(workdir), default=0)
  assert 0 < last < STEPS
  workers = start_pair(unwatched, [workdir])
  outputs = [w.communicate(timeout=300)[0] for w in workers]
  assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert resumes_from_last_checkpoint(outputs[0], last), outputs[0][-3000:]
  chex.assert_trees_all_equal(plots.latest_params(workdir), plots.latest_params(reference))
  assert logged_steps(workdir) == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------------------------
# The pieces on their own (fast): the watchdog, the SIGTERM guard, the config check, the launcher.

def test_watchdog_names_the_phase_step_and_process_and_scales_the_step_limit():
  calls = []
  dog = Watchdog({'step': 0.3, 'step_factor': 4.0}, process_index=2, poll=0.02,
                 exit=lambda line, code: calls.append((line, code)))
  try:
    for step in range(1, 7):                   # steps of ~0.1 s: the limit becomes 4 x 0.1 > 0.3 s
      dog.enter('step', step)
      time.sleep(0.1)
    assert dog.limit('step') > 0.35 and not calls
    dog.enter('eval', 6)                         # no limit for eval here
    time.sleep(0.5)
    assert not calls
    dog.enter('step', 7)
    time.sleep(1.0)
  finally:
    dog.stop()
  (line, code), = calls[:1]
  assert code == EXIT_STUCK and '\n' not in line
  assert line.startswith('watchdog: process 2 stuck in step at step 7 for more than') and 'step_s' in line


def test_sigterm_guard_exits_after_the_grace_period_unless_finished():
  calls = []
  old = signal.signal(signal.SIGTERM, lambda *_: None)       # the trainer's Python handler
  try:
    guard = SigtermGuard(0.3, process_index=1, describe=lambda: 'in eval at step 9',
                         exit=lambda line, code: calls.append((line, code)))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)
    guard.finished()
    assert calls == [('SIGTERM: process 1 could not stop within 0.3 s (config.watchdog.sigterm_grace_s) in '
                      'eval at step 9; no checkpoint was written for the current interval; exiting with '
                      f'code {EXIT_SIGTERM}.', EXIT_SIGTERM)]
    calls.clear()
    guard = SigtermGuard(0.5, exit=lambda line, code: calls.append((line, code)))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    guard.finished()                             # the main thread saved and stopped in time
    time.sleep(0.6)
    assert not calls
  finally:
    signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize('field, value, message', [
    ('step_s', -1.0, 'config.watchdog.step_s must be a number >= 0'),
    ('sigterm_grace_s', -5.0, 'config.watchdog.sigterm_grace_s must be a number >= 0'),
    ('heartbeat_s', 0, 'config.watchdog.heartbeat_s must be an integer >= 1'),
])
def test_bad_watchdog_fields_are_one_line(tiny_tfds, field, value, message):
  config = tiny_config(*tiny_tfds)
  with config.unlocked():
    config.watchdog[field] = value
  with pytest.raises(ConfigError) as error:
    validate.validate(config, device_count=8)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_launcher_restarts_on_exit_75_and_multiprocess_aborts_with_bounded_retries_and_turns_the_watchdog_on(tmp_path):
  script = tmp_path / 'flaky.sh'
  script.write_text('n=$(cat "$1" 2>/dev/null || echo 0); echo $((n+1)) > "$1"\n'
                    '[ "$n" -lt "$2" ] && exit 75\nprintf "%s\\n" "$@" > "$1.args"; exit 0\n')
  restart = os.path.join(REPO, 'launch', 'restart.sh')
  run = lambda *args, **env: subprocess.run(['bash', restart, *args], env=dict(os.environ, **env),
                                            capture_output=True, text=True, timeout=60)
  result = run('--watchdog', 'bash', str(script), str(tmp_path / 'a'), '2', '--config=x.py', '--workdir=w')
  assert result.returncode == 0 and (tmp_path / 'a').read_text().strip() == '3', result.stderr
  assert result.stderr.count('[restart]') == 2
  assert (tmp_path / 'a.args').read_text().split()[2:4] == ['--config=x.py', '--config.watchdog.enabled=True']
  result = run('bash', str(script), str(tmp_path / 'b'), '9', GHL_RESTARTS='1')
  assert result.returncode == EXIT_STUCK and (tmp_path / 'b').read_text().strip() == '2'
  result = run('bash', '-c', 'exit 3')
  assert result.returncode == 3 and '[restart]' not in result.stderr
  aborts = 'echo x >> "$0"; [ $(wc -l < "$0") -lt 3 ] && kill -ABRT $$; exit 0'
  result = run('bash', '-c', aborts, str(tmp_path / 'c'), JAX_NUM_PROCESSES='2')    # the runtime's abort
  assert result.returncode == 0 and result.stderr.count('exit 134 (the distributed runtime ended') == 2, \
      result.stderr
  result = run('bash', '-c', aborts, str(tmp_path / 'd'), JAX_NUM_PROCESSES='1')    # one process: a crash
  assert result.returncode == 134 and '[restart]' not in result.stderr
