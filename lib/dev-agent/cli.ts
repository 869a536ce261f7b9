// `fastify-consul-native dev-agent`: runs the dev agent until SIGINT/SIGTERM. The one place in
// lib/ that writes to stdout: the agent's address (and its gRPC address as a CONSUL_GRPC_ADDR
// line when it has one), so scripts can read them.
import type { EventEmitter } from 'node:events'
import { startDevAgent } from './index'
import type { DevAgentOptions } from './index'
import { rolloutMain } from '../rollout-cli'

export const USAGE = `Usage: fastify-consul-native dev-agent [options]
       fastify-consul-native explain|verify ... (see fastify-consul-native explain --help)

Runs an embedded Consul dev agent (its HTTP API, and with --grpc-port the gRPC CA service)
until interrupted.

Options:
  --port <n>                 TCP port (default 8500, 0 for any free port)
  --grpc-port <n>            also serve Consul's gRPC CA service (WatchRoots, Sign) on this
                             port, plaintext, for agentless clients (0 for any free port)
  --host <addr>              address to listen on (default 127.0.0.1)
  --datacenter <name>        datacenter (default dc1)
  --node-name <name>         node name (default: this host's name)
  --default-policy <policy>  default_intention_policy: allow or deny (default: unset, which allows)
  --leaf-ttl <duration>      leaf certificate TTL as a Go duration, longer than 1m (default 72h)
  -h, --help                 show this help
`

export interface CliIO {
  stdout: { write: (text: string) => unknown }
  stderr: { write: (text: string) => unknown }
  /** Where SIGINT and SIGTERM arrive (the process). */
  signals: Pick<EventEmitter, 'once' | 'off'>
  /** The CONSUL_* variables `explain` and `verify` read; default process.env. */
  env?: NodeJS.ProcessEnv
}

export type ParsedArgs = { help: true } | { help: false, options: DevAgentOptions }

class UsageError extends Error {}

const VALUE_OPTIONS = new Set(['--port', '--grpc-port', '--host', '--datacenter', '--node-name', '--default-policy', '--leaf-ttl'])

/** Parses `dev-agent [--option value | --option=value]...`. Throws on a usage error. */
export function parseArgs (argv: readonly string[]): ParsedArgs {
  if (argv.includes('-h') || argv.includes('--help')) return { help: true }
  const [command, ...rest] = argv
  if (command !== 'dev-agent') throw new UsageError(command === undefined ? 'missing command' : `unknown command ${JSON.stringify(command)}`)
  const values = new Map<string, string>()
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i] as string
    const eq = arg.indexOf('=')
    const name = eq === -1 ? arg : arg.slice(0, eq)
    if (!VALUE_OPTIONS.has(name)) throw new UsageError(`unknown option ${JSON.stringify(arg)}`)
    const value = eq === -1 ? rest[++i] : arg.slice(eq + 1)
    if (value === undefined) throw new UsageError(`${name} needs a value`)
    values.set(name, value)
  }
  const options: DevAgentOptions = { port: 8500 }
  for (const [flag, key] of [['--port', 'port'], ['--grpc-port', 'grpcPort']] as const) {
    const value = values.get(flag)
    if (value === undefined) continue
    if (!/^\d+$/.test(value)) throw new UsageError(`${flag} must be a number, got ${JSON.stringify(value)}`)
    options[key] = Number(value)
  }
  const host = values.get('--host')
  if (host !== undefined) options.host = host
  const datacenter = values.get('--datacenter')
  if (datacenter !== undefined) options.datacenter = datacenter
  const nodeName = values.get('--node-name')
  if (nodeName !== undefined) options.nodeName = nodeName
  const policy = values.get('--default-policy')
  if (policy !== undefined) {
    if (policy !== 'allow' && policy !== 'deny') throw new UsageError(`--default-policy must be allow or deny, got ${JSON.stringify(policy)}`)
    options.defaultPolicy = policy
  }
  const leafTTL = values.get('--leaf-ttl')
  if (leafTTL !== undefined) options.leafTTL = leafTTL
  return { help: false, options }
}

/** Runs the command; resolves with the exit code once the agent has stopped. */
export async function main (argv: readonly string[], io: CliIO): Promise<number> {
  if (argv[0] === 'explain' || argv[0] === 'verify') return await rolloutMain(argv, { stdout: io.stdout, stderr: io.stderr, env: io.env ?? process.env })
  let parsed: ParsedArgs
  try {
    parsed = parseArgs(argv)
  } catch (err) {
    io.stderr.write(`fastify-consul-native: ${(err as Error).message}\n\n${USAGE}`)
    return 2
  }
  if (parsed.help) {
    io.stdout.write(USAGE)
    return 0
  }
  let agent
  try {
    agent = await startDevAgent(parsed.options)
  } catch (err) {
    io.stderr.write(`fastify-consul-native: cannot start the dev agent: ${(err as Error).message}\n`)
    return 1
  }
  io.stdout.write(`${agent.address}\n`)
  if (agent.grpcAddress !== null) io.stdout.write(`CONSUL_GRPC_ADDR=${agent.grpcAddress}\n`)
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      io.signals.off('SIGINT', stop)
      io.signals.off('SIGTERM', stop)
      resolve()
    }
    io.signals.once('SIGINT', stop)
    io.signals.once('SIGTERM', stop)
  })
  await agent.close()
  return 0
}

/** Entry point of `bin/fastify-consul-native.js`. */
export function run (argv: readonly string[] = process.argv.slice(2)): Promise<void> {
  return main(argv, { stdout: process.stdout, stderr: process.stderr, signals: process }).then((code) => {
    process.exitCode = code
  })
}
