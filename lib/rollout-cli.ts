// `fastify-consul-native explain` and `verify` (docs/semantics.md#rollout-cli): the live intentions,
// protocol, default policy and mesh normalization of a service, read from the agent the way the
// plugin reads them, and requests decided by the plugin's own pipeline (lib/explain.ts). Writes
// to stdout and stderr only through the `io` it is given.
import { readFile } from 'node:fs/promises'
import { AgentClient } from './agent/client'
import { resolveAgentConfig } from './agent/config'
import type { AgentOptions } from './agent/config'
import type { Intention, RequestNormalization } from './agent/wire'
import { candidateIntentions, compileCandidate } from './candidate'
import { explainRequest } from './explain'
import type { ExplainInput, Explanation, TraceStep } from './explain'
import { compilePolicy } from './intentions/policy'
import type { RouterOptions } from './intentions/path'
import type { ServiceRules } from './intentions/request'
import { SERVICE_POLICY } from './route-policy'
import { agentDefaultPolicy, protocolOf } from './sync'

export const ROLLOUT_USAGE = `Usage:
  fastify-consul-native explain --service <name> --source <caller> [options] <METHOD> <path>
  fastify-consul-native verify --service <name> [options] <cases.json>

explain decides one request as the plugin would, with the service's live intentions, and prints
the decision and every step that led to it. verify decides each case of a JSON file
([{ "source", "method", "path", "headers"?, "expect": "allow" | "deny" }]) and prints each one
whose decision differs from "expect", with its trace.

Options:
  --service <name>           the destination service (required)
  --source <caller>          explain: the caller, a service name or a SPIFFE ID
  -H, --header 'name: value' explain: a request header (repeatable)
  --candidate <file>         a service-intentions entry (JSON, as consul config write takes):
                             explain shows live and candidate side by side; verify checks the
                             candidate instead of the live intentions
  --json                     print JSON
  --http-addr <addr>         the agent (default: CONSUL_HTTP_ADDR, then 127.0.0.1:8500)
  --token <token>            ACL token (default: CONSUL_HTTP_TOKEN_FILE, then CONSUL_HTTP_TOKEN)
  --datacenter <dc>          datacenter of the intentions
  --namespace <ns>           Consul Enterprise namespace
  --partition <partition>    Consul Enterprise admin partition
  --default-policy <policy>  allow, deny or agent (default agent: the agent's, as the plugin reads it)
  -h, --help                 show this help

The agent's TLS settings come from CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY,
CONSUL_TLS_SERVER_NAME and CONSUL_HTTP_SSL_VERIFY, as for the plugin.

Exit status: explain 0; verify 0 when every case agrees, 1 when any disagrees; 2 on errors
(agent unreachable, bad file, unknown service, usage).
`

export interface RolloutIO {
  stdout: { write: (text: string) => unknown }
  stderr: { write: (text: string) => unknown }
  env: NodeJS.ProcessEnv
}

/** A failure that ends the command with exit status 2 and one line. */
class CommandError extends Error {}
/** A mistake in the arguments: the line points to --help. */
class UsageError extends CommandError {}

interface Parsed {
  command: 'explain' | 'verify'
  help: boolean
  service: string
  source: string | null
  headers: string[]
  candidate: string | null
  json: boolean
  agent: AgentOptions
  datacenter?: string
  namespace?: string
  partition?: string
  defaultPolicy: 'allow' | 'deny' | 'agent'
  positional: string[]
}

const VALUE_OPTIONS = new Set(['--service', '--source', '-H', '--header', '--candidate', '--http-addr', '--token', '--datacenter',
  '--namespace', '--partition', '--default-policy'])

/** Parses the arguments after the command name. Throws CommandError on a usage error. */
export function parseRolloutArgs (command: 'explain' | 'verify', argv: readonly string[]): Parsed {
  const parsed: Parsed = { command, help: false, service: '', source: null, headers: [], candidate: null, json: false, agent: {}, defaultPolicy: 'agent', positional: [] }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string
    if (arg === '-h' || arg === '--help') { parsed.help = true; continue }
    if (arg === '--json') { parsed.json = true; continue }
    if (!arg.startsWith('-') || arg === '-') { parsed.positional.push(arg); continue }
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1
    const name = eq === -1 ? arg : arg.slice(0, eq)
    if (!VALUE_OPTIONS.has(name)) throw new UsageError(`unknown option ${JSON.stringify(arg)}`)
    const value = eq === -1 ? argv[++i] : arg.slice(eq + 1)
    if (value === undefined) throw new UsageError(`${name} needs a value`)
    switch (name) {
      case '--service': parsed.service = value; break
      case '--source': parsed.source = value; break
      case '-H': case '--header': parsed.headers.push(value); break
      case '--candidate': parsed.candidate = value; break
      case '--http-addr': parsed.agent.address = value; break
      case '--token': parsed.agent.token = value; break
      case '--datacenter': parsed.datacenter = value; break
      case '--namespace': parsed.namespace = value; break
      case '--partition': parsed.partition = value; break
      default:
        if (value !== 'allow' && value !== 'deny' && value !== 'agent') throw new UsageError(`--default-policy must be allow, deny or agent, got ${JSON.stringify(value)}`)
        parsed.defaultPolicy = value
    }
  }
  if (parsed.help) return parsed
  if (parsed.service === '') throw new UsageError('--service is required')
  if (command === 'explain') {
    if (parsed.source === null) throw new UsageError('explain needs --source')
    if (parsed.positional.length !== 2) throw new UsageError('explain needs a method and a path, such as GET /admin')
  } else {
    if (parsed.positional.length !== 1) throw new UsageError('verify needs one case file')
    if (parsed.source !== null || parsed.headers.length > 0) throw new UsageError('verify takes sources and headers from the case file')
  }
  return parsed
}

/** `-H 'name: value'` as curl takes it. */
function headersOf (lines: readonly string[]): Record<string, string[]> {
  const out: Record<string, string[]> = {}
  for (const line of lines) {
    const colon = line.indexOf(':', 1)
    if (colon === -1) throw new UsageError(`header ${JSON.stringify(line)} must be "name: value"`)
    const name = line.slice(0, colon).trim()
    ;(out[name] ??= []).push(line.slice(colon + 1).trim())
  }
  return out
}

// The CLI cannot see the app's router options: Fastify's defaults.
const DEFAULT_ROUTER: RouterOptions = { caseSensitive: true, ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, useSemicolonDelimiter: false }

interface Live { rules: ServiceRules, intentions: Intention[], defaultAllow: boolean, protocol: string, normalization: RequestNormalization | null, trustDomain: string }

/** Reads what the plugin's sync would hold for `service`; an unknown service is an error. */
async function loadLive (parsed: Parsed, env: NodeJS.ProcessEnv): Promise<Live> {
  const client = new AgentClient(resolveAgentConfig(parsed.agent, env), { datacenter: parsed.datacenter, namespace: parsed.namespace, partition: parsed.partition })
  try {
    const service = parsed.service
    const [intentions, serviceDefaults, proxyDefaults, mesh, instances, roots] = await Promise.all([
      client.intentionsMatch(service),
      client.configEntry('service-defaults', service),
      client.configEntry('proxy-defaults', 'global'),
      client.configEntry('mesh', 'mesh'),
      client.request<unknown[]>('GET', `/v1/health/connect/${encodeURIComponent(service)}`),
      // A SPIFFE ID of another trust domain is explained as the plugin would treat it: unauthenticated.
      client.roots()
    ])
    // Known: registered in the mesh, or named by its own intentions or service-defaults.
    const known = (Array.isArray(instances.body) && instances.body.length > 0) || serviceDefaults.body !== null ||
      intentions.body.some((ixn) => ixn.DestinationName === service)
    if (!known) throw new CommandError(`unknown service ${JSON.stringify(service)}: no instance is registered and no intentions or service-defaults name it`)
    const defaultAllow = parsed.defaultPolicy === 'agent' ? (await agentDefaultPolicy(client)).allow : parsed.defaultPolicy === 'allow'
    const protocol = protocolOf(serviceDefaults.body, proxyDefaults.body)
    const normalization = mesh.body?.requestNormalization ?? null
    const policy = compilePolicy({ destination: service, intentions: intentions.body, defaultAllow, protocol })
    return { rules: { policy, normalization, router: DEFAULT_ROUTER, agentDecides: false }, intentions: intentions.body, defaultAllow, protocol, normalization, trustDomain: roots.body.TrustDomain }
  } finally {
    await client.close()
  }
}

async function readJson (path: string, what: string): Promise<unknown> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    throw new CommandError(`cannot read ${what} ${path}: ${(err as Error).message}`)
  }
  try {
    return JSON.parse(text)
  } catch (err) {
    throw new CommandError(`${what} ${path} is not JSON: ${(err as Error).message}`)
  }
}

async function candidateRules (parsed: Parsed, live: Live): Promise<ServiceRules | null> {
  if (parsed.candidate === null) return null
  const raw = await readJson(parsed.candidate, 'candidate')
  try {
    const policy = compileCandidate(parsed.service, candidateIntentions(raw, parsed.service), live)
    return { ...live.rules, policy }
  } catch (err) {
    throw new CommandError(`candidate ${parsed.candidate}: ${(err as Error).message}`)
  }
}

interface Case extends ExplainInput { expect: 'allow' | 'deny' }

function readCases (raw: unknown, file: string): Case[] {
  if (!Array.isArray(raw)) throw new CommandError(`case file ${file} must hold a JSON array of { source, method, path, headers?, expect }`)
  return raw.map((c: unknown, i): Case => {
    const at = `case file ${file}: case ${i + 1}`
    if (c === null || typeof c !== 'object' || Array.isArray(c)) throw new CommandError(`${at} must be an object`)
    const o = c as Record<string, unknown>
    for (const key of Object.keys(o)) {
      if (!['source', 'method', 'path', 'headers', 'expect'].includes(key)) throw new CommandError(`${at}: unknown key ${JSON.stringify(key)}`)
    }
    for (const key of ['source', 'method', 'path'] as const) {
      if (typeof o[key] !== 'string' || o[key] === '') throw new CommandError(`${at}: ${key} must be a non-empty string`)
    }
    if (o.expect !== 'allow' && o.expect !== 'deny') throw new CommandError(`${at}: expect must be "allow" or "deny"`)
    return o as unknown as Case
  })
}

/** One decision, explained; an invalid input is a command error. */
function explainWith (rules: ServiceRules, input: ExplainInput, trustDomain: string): Explanation {
  try {
    return explainRequest(rules, SERVICE_POLICY, null, input, trustDomain)
  } catch (err) {
    throw new CommandError((err as Error).message)
  }
}

function verdictWord (e: Explanation): string {
  return e.outcome === 'bad-path' || e.outcome === 'bad-header' ? 'REJECT (400)' : e.allow ? 'ALLOW' : 'DENY'
}

/** One trace step as a line of the human output. */
export function stepLine (s: TraceStep): string {
  switch (s.step) {
    case 'route': return `route ${s.route}${s.exempt ? ' (exempt)' : ''}, ${s.overrides} override source(s)`
    case 'normalization': return s.rejected === null ? `path ${s.path as string}` : `rejected by the mesh request normalization (${s.rejected})`
    case 'source': return `${s.intention}: ${s.matched ? 'source matches' : 'source does not match'}`
    case 'permission': return `  permission ${s.permission} (${s.action}) on ${s.path}: ${s.matched ? 'matches' : s.failed === 'header' ? `header ${s.header as string} does not match` : s.failed === 'jwt' ? 'needs a JWT' : `${s.failed as string} does not match`}`
    default: return s.reason
  }
}

function render (label: string, e: Explanation): string {
  let out = `${label}${verdictWord(e)}  ${e.reason}\n`
  for (const s of e.trace) out += `    ${stepLine(s)}\n`
  return out
}

async function explainCommand (parsed: Parsed, io: RolloutIO): Promise<number> {
  const input: ExplainInput = { source: parsed.source as string, method: parsed.positional[0] as string, path: parsed.positional[1] as string, headers: headersOf(parsed.headers) }
  const live = await loadLive(parsed, io.env)
  const candidate = await candidateRules(parsed, live)
  const liveExplained = explainWith(live.rules, input, live.trustDomain)
  const candidateExplained = candidate === null ? null : explainWith(candidate, input, live.trustDomain)
  if (parsed.json) {
    // The live explanation at the top, in the shape of fastify.consulNative.explain(), and under `live` too.
    const json = { ...liveExplained, service: parsed.service, request: input, live: liveExplained, ...(candidateExplained === null ? {} : { candidate: candidateExplained }) }
    io.stdout.write(JSON.stringify(json, null, 2) + '\n')
    return 0
  }
  let out = `${parsed.service} <- ${input.source}: ${input.method} ${input.path}\n`
  out += render(candidateExplained === null ? '  ' : '  live:      ', liveExplained)
  if (candidateExplained !== null) {
    out += render('  candidate: ', candidateExplained)
    out += candidateExplained.allow === liveExplained.allow ? '  same verdict\n' : '  the candidate changes this verdict\n'
  }
  io.stdout.write(out)
  return 0
}

async function verifyCommand (parsed: Parsed, io: RolloutIO): Promise<number> {
  const file = parsed.positional[0] as string
  const cases = readCases(await readJson(file, 'case file'), file)
  const live = await loadLive(parsed, io.env)
  const rules = (await candidateRules(parsed, live)) ?? live.rules
  const failures: Array<{ index: number, case: Case, got: Explanation }> = []
  cases.forEach((c, i) => {
    const got = explainWith(rules, c, live.trustDomain)
    if ((got.allow ? 'allow' : 'deny') !== c.expect) failures.push({ index: i + 1, case: c, got })
  })
  const against = parsed.candidate === null ? 'live intentions' : `candidate ${parsed.candidate}`
  if (parsed.json) {
    io.stdout.write(JSON.stringify({ service: parsed.service, against, cases: cases.length, disagreements: failures.map((f) => ({ case: f.index, ...f.case, got: f.got })) }, null, 2) + '\n')
  } else {
    let out = ''
    for (const f of failures) {
      out += `case ${f.index}: ${f.case.source} ${f.case.method} ${f.case.path} expected ${f.case.expect}, got ${f.got.allow ? 'allow' : 'deny'}\n`
      out += render('  ', f.got)
    }
    out += `${cases.length} case(s) against the ${against} of ${parsed.service}: ${failures.length === 0 ? 'all agree' : `${failures.length} disagree`}\n`
    io.stdout.write(out)
  }
  return failures.length === 0 ? 0 : 1
}

/** Runs `explain` or `verify`; resolves with the exit status. */
export async function rolloutMain (argv: readonly string[], io: RolloutIO): Promise<number> {
  const [command, ...rest] = argv
  try {
    const parsed = parseRolloutArgs(command as 'explain' | 'verify', rest)
    if (parsed.help) {
      io.stdout.write(ROLLOUT_USAGE)
      return 0
    }
    return command === 'explain' ? await explainCommand(parsed, io) : await verifyCommand(parsed, io)
  } catch (err) {
    // One clear line: agent unreachable, bad file, unknown service, usage.
    const message = (err as Error).message.split('\n')[0] as string
    io.stderr.write(`fastify-consul-native ${command as string}: ${message}${err instanceof UsageError ? ' (see --help)' : ''}\n`)
    return 2
  }
}
