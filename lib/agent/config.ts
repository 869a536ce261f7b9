// How to reach the local Consul agent: explicit options first, then the CONSUL_* variables the
// consul CLI reads, so one environment configures both. Resolved once, at registration, and every
// mistake is reported with the option or variable to fix.
import { readFileSync, readdirSync, realpathSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { InvalidOptionError } from '../errors'

export interface AgentOptions {
  /** `host:port`, `http://host:port`, `https://host:port` or `unix:///path`. Default: CONSUL_HTTP_ADDR, then `127.0.0.1:8500`. */
  address?: string
  /** ACL token sent as `X-Consul-Token`. Default: CONSUL_HTTP_TOKEN_FILE, then CONSUL_HTTP_TOKEN. */
  token?: string
  /** File holding the ACL token (read once, trimmed; an empty file counts as no token here, as for the consul CLI). */
  tokenFile?: string
  /** CA certificate(s) that sign the agent's HTTPS certificate (PEM). Default: CONSUL_CACERT, then CONSUL_CAPATH. */
  ca?: string | Buffer
  caFile?: string
  /** Directory of PEM files (searched recursively), every certificate in them a CA to trust. Default: CONSUL_CAPATH. */
  caPath?: string
  /** Client certificate (PEM) for agents that verify incoming HTTPS clients. Default: CONSUL_CLIENT_CERT. */
  cert?: string | Buffer
  certFile?: string
  /** Private key (PEM) of `cert`. Default: CONSUL_CLIENT_KEY. */
  key?: string | Buffer
  keyFile?: string
  /** Name to verify in the agent's certificate (and sent as SNI); a `:port` is dropped. Default: CONSUL_TLS_SERVER_NAME. */
  tlsServerName?: string
  /** Do not verify the agent's certificate. Default: CONSUL_HTTP_SSL_VERIFY=false. */
  insecureSkipVerify?: boolean
  /**
   * Run the plugin's agent traffic on a worker thread, so that the application's request path keeps
   * the speed it has in a process without an HTTP client (docs/semantics.md#agent-worker). Default false.
   */
  worker?: boolean
}

export interface AgentTlsConfig {
  ca?: string | Buffer
  cert?: string | Buffer
  key?: string | Buffer
  servername?: string
  rejectUnauthorized: boolean
}

export interface AgentConfig {
  /** Origin of every request, e.g. `http://127.0.0.1:8500`; `http(s)://localhost` for a Unix socket. */
  readonly origin: string
  readonly socketPath: string | null
  /** Set only for `https`. */
  readonly tls: AgentTlsConfig | null
  readonly token: string | null
  /** Where the agent is, for logs and errors; never contains the token. */
  readonly display: string
}

const DEFAULT_ADDRESS = '127.0.0.1:8500'

/** Where a value came from, so an error names the thing the user actually wrote. */
interface Source { value: string, from: string }

const AGENT_OPTION_NAMES: ReadonlySet<string> = new Set(['address', 'token', 'tokenFile', 'ca', 'caFile', 'caPath', 'cert', 'certFile', 'key', 'keyFile',
  'tlsServerName', 'insecureSkipVerify', 'worker'])

export function resolveAgentConfig (opts: AgentOptions | undefined, env: NodeJS.ProcessEnv): AgentConfig {
  if (opts !== undefined && (opts === null || typeof opts !== 'object' || Array.isArray(opts))) {
    throw new InvalidOptionError('agent', 'must be an object')
  }
  const o: AgentOptions = opts ?? {}
  // A misspelt key would otherwise fall back to a CONSUL_* variable or the default without a word.
  const unknown = Object.keys(o).find((key) => !AGENT_OPTION_NAMES.has(key))
  if (unknown !== undefined) throw new InvalidOptionError(`agent.${unknown}`, `is not an option (known: ${[...AGENT_OPTION_NAMES].join(', ')})`)

  const address = pickString(o, 'address', env, 'CONSUL_HTTP_ADDR') ??
    { value: DEFAULT_ADDRESS, from: 'default' }
  const useTls = envBool(env, 'CONSUL_HTTP_SSL') ?? false
  // Like the consul CLI, CONSUL_HTTP_SSL=true is never undone by an http:// in CONSUL_HTTP_ADDR; an
  // http:// written in the option is explicit and stays.
  const target = parseAddress(address, useTls, useTls && address.from !== 'option')

  return {
    origin: target.origin,
    socketPath: target.socketPath,
    tls: target.https ? resolveTls(o, env) : noTlsOptions(o, target.display),
    token: resolveToken(o, env),
    display: target.display
  }
}

interface Target { origin: string, socketPath: string | null, https: boolean, display: string }

function parseAddress (address: Source, sslByDefault: boolean, sslOverHttp: boolean): Target {
  const raw = address.value.trim()
  // Name what the user wrote: the option, or the variable it came from.
  const subject = address.from === 'option' ? 'the address' : address.from
  if (raw === '') throw new InvalidOptionError('agent.address', `${subject} is empty`)
  const schemeMatch = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//.exec(raw)
  if (schemeMatch === null && raw.includes('://')) {
    throw new InvalidOptionError('agent.address', `${subject} is not a URL: "${raw}"`)
  }
  const scheme = schemeMatch?.[1]?.toLowerCase()

  if (scheme === 'unix') {
    const socketPath = raw.slice('unix://'.length)
    if (socketPath === '') {
      throw new InvalidOptionError('agent.address', `${subject} has no socket path: "${raw}" (write unix:///path/to/consul.sock)`)
    }
    // The Go client keeps the scheme choice (CONSUL_HTTP_SSL) for sockets too; the host is a placeholder.
    const https = sslByDefault
    return { origin: https ? 'https://localhost' : 'http://localhost', socketPath, https, display: `unix://${socketPath}` }
  }
  if (scheme !== undefined && scheme !== 'http' && scheme !== 'https') {
    throw new InvalidOptionError('agent.address',
      `${subject} has unsupported scheme "${scheme}": "${raw}" (use http://, https:// or unix://)`)
  }

  let url: URL
  try {
    url = new URL(scheme === undefined ? `${sslByDefault ? 'https' : 'http'}://${raw}` : raw)
  } catch (err) {
    throw new InvalidOptionError('agent.address', `${subject} is not a URL: "${raw}"`, { cause: err })
  }
  // WHATWG URL accepts hosts such as "ht!tp"; a Consul agent is a DNS name or an IP address.
  if (!/^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$/.test(url.hostname)) {
    throw new InvalidOptionError('agent.address', `${subject} is not a URL: "${raw}"`)
  }
  if (url.username !== '' || url.password !== '' || url.pathname !== '/' || url.search !== '' || url.hash !== '') {
    throw new InvalidOptionError('agent.address',
      `${subject} must be host:port or scheme://host:port, without credentials, path or query: "${raw}"`)
  }
  if (url.protocol === 'http:' && sslOverHttp) url.protocol = 'https:'
  return { origin: url.origin, socketPath: null, https: url.protocol === 'https:', display: url.origin }
}

function resolveToken (o: AgentOptions, env: NodeJS.ProcessEnv): string | null {
  if (o.token !== undefined && o.tokenFile !== undefined) {
    throw new InvalidOptionError('agent.token', 'set either agent.token or agent.tokenFile, not both')
  }
  if (o.token !== undefined) return checkToken(requireString(o.token, 'agent.token'), 'agent.token')
  // The consul CLI lets a token file win over the token variable when both are set, and reads an
  // empty (or blank) token file as no token from it, going on to the next source; so do we.
  if (o.tokenFile !== undefined) {
    const token = readToken(requireString(o.tokenFile, 'agent.tokenFile'), 'agent.tokenFile', 'agent.tokenFile')
    if (token !== null) return token
  }
  const file = nonEmpty(env.CONSUL_HTTP_TOKEN_FILE)
  if (file !== undefined) {
    const token = readToken(file, 'agent.tokenFile', 'CONSUL_HTTP_TOKEN_FILE')
    if (token !== null) return token
  }
  const token = nonEmpty(env.CONSUL_HTTP_TOKEN)
  return token === undefined ? null : checkToken(token, 'CONSUL_HTTP_TOKEN')
}

/** The token in `file`, or null when the file is empty or blank. */
function readToken (file: string, name: string, from: string): string | null {
  const token = readFile(file, name, `${from} ("${file}")`).toString('utf8').trim()
  return token === '' ? null : checkToken(token, `the token in ${from} ("${file}")`)
}

/** A token with a control character or non-ASCII byte could not be sent as a header value. */
function checkToken (token: string, what: string): string {
  if (!/^[\x21-\x7e]+$/.test(token)) {
    throw new InvalidOptionError('agent.token', `${what} must be printable ASCII without spaces`)
  }
  return token
}

function resolveTls (o: AgentOptions, env: NodeJS.ProcessEnv): AgentTlsConfig {
  const ca = resolveCa(o, env)
  const cert = pem(o, 'cert', 'certFile', env, 'CONSUL_CLIENT_CERT')
  const key = pem(o, 'key', 'keyFile', env, 'CONSUL_CLIENT_KEY')
  if (cert !== undefined && key === undefined) {
    throw new InvalidOptionError('agent.key', 'a client certificate was given without its key: set agent.key, agent.keyFile or CONSUL_CLIENT_KEY')
  }
  if (key !== undefined && cert === undefined) {
    throw new InvalidOptionError('agent.cert', 'a client key was given without its certificate: set agent.cert, agent.certFile or CONSUL_CLIENT_CERT')
  }
  const servername = withoutPort(pickString(o, 'tlsServerName', env, 'CONSUL_TLS_SERVER_NAME')?.value)
  let skipVerify: boolean
  if (o.insecureSkipVerify !== undefined) {
    if (typeof o.insecureSkipVerify !== 'boolean') {
      throw new InvalidOptionError('agent.insecureSkipVerify', 'must be a boolean')
    }
    skipVerify = o.insecureSkipVerify
  } else {
    skipVerify = envBool(env, 'CONSUL_HTTP_SSL_VERIFY') === false
  }

  const tls: AgentTlsConfig = { rejectUnauthorized: !skipVerify }
  if (ca !== undefined) tls.ca = ca
  if (cert !== undefined) tls.cert = cert
  if (key !== undefined) tls.key = key
  if (servername !== undefined) tls.servername = servername
  return tls
}

/**
 * The agent's CA: `ca`/`caFile`, else `caPath`, else CONSUL_CACERT, else CONSUL_CAPATH (a file
 * wins over a directory, as in the consul CLI); undefined means the system's CAs.
 */
function resolveCa (o: AgentOptions, env: NodeJS.ProcessEnv): string | Buffer | undefined {
  if (o.caPath !== undefined && (o.ca !== undefined || o.caFile !== undefined)) {
    throw new InvalidOptionError('agent.caPath', `set one of agent.ca, agent.caFile or agent.caPath, not ${o.ca !== undefined ? 'agent.ca' : 'agent.caFile'} and agent.caPath`)
  }
  if (o.caPath !== undefined) return readCaPath(requireString(o.caPath, 'agent.caPath'), 'agent.caPath')
  const ca = pem(o, 'ca', 'caFile', env, 'CONSUL_CACERT')
  if (ca !== undefined) return ca
  const dir = nonEmpty(env.CONSUL_CAPATH)
  return dir === undefined ? undefined : readCaPath(dir, 'CONSUL_CAPATH')
}

/**
 * Every file under `dir`, recursively, in name order; each must hold a PEM certificate. Symbolic
 * links are followed (a Kubernetes secret mount is made of them), each directory read once.
 */
function readCaPath (dir: string, from: string): Buffer {
  const what = `${from} ("${dir}")`
  const pems: Buffer[] = []
  const seen = new Set<string>()
  const walk = (path: string): void => {
    let names: string[]
    try {
      const real = realpathSync(path)
      names = statSync(real).isDirectory() && !seen.has(real) ? readdirSync(real).sort() : []
      seen.add(real)
    } catch (err) {
      throw new InvalidOptionError('agent.caPath', `cannot read ${what}: ${(err as Error).message}`, { cause: err })
    }
    for (const name of names) {
      const child = join(path, name)
      let isDir: boolean
      try {
        isDir = statSync(child).isDirectory()
      } catch (err) {
        throw new InvalidOptionError('agent.caPath', `cannot read ${child} in ${what}: ${(err as Error).message}`, { cause: err })
      }
      if (isDir) {
        walk(child)
        continue
      }
      const content = readFile(child, 'agent.caPath', `${child} in ${what}`)
      if (!content.includes('-----BEGIN CERTIFICATE-----')) {
        throw new InvalidOptionError('agent.caPath', `${child} in ${what} holds no PEM certificate`)
      }
      pems.push(content, Buffer.from('\n'))
    }
  }
  walk(dir)
  if (pems.length === 0) throw new InvalidOptionError('agent.caPath', `${what} is not a directory holding PEM certificates`)
  return Buffer.concat(pems)
}

/**
 * A server name given as host:port, as the consul CLI accepts it, without its port; a bracketed
 * IPv6 literal without its brackets (Node verifies an IP name against the certificate's IP SANs).
 */
function withoutPort (name: string | undefined): string | undefined {
  if (name === undefined) return undefined
  const colon = name.lastIndexOf(':')
  // A port: after the last colon, outside brackets, and not inside a bare IPv6 literal.
  const host = colon > name.lastIndexOf(']') && (name.startsWith('[') || name.indexOf(':') === colon) ? name.slice(0, colon) : name
  return host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host
}

/** `agent.worker`, checked: whether the plugin's agent traffic runs on the agent worker thread. */
export function resolveAgentWorker (opts: AgentOptions | undefined): boolean {
  const value = opts?.worker
  if (value === undefined) return false
  if (typeof value !== 'boolean') throw new InvalidOptionError('agent.worker', `must be true or false, got ${JSON.stringify(value)}`)
  return value
}

/**
 * TLS options next to a plain-HTTP address are almost always a forgotten `https://`; the CONSUL_*
 * variables are not checked because a shell may export them for other agents.
 */
function noTlsOptions (o: AgentOptions, display: string): null {
  for (const name of ['ca', 'caFile', 'caPath', 'cert', 'certFile', 'key', 'keyFile', 'tlsServerName', 'insecureSkipVerify'] as const) {
    if (o[name] !== undefined) {
      throw new InvalidOptionError(`agent.${name}`, `only applies to an HTTPS agent, but the address is ${display} (write https://…)`)
    }
  }
  return null
}

function pem (o: AgentOptions, inline: 'ca' | 'cert' | 'key', file: 'caFile' | 'certFile' | 'keyFile',
  env: NodeJS.ProcessEnv, envName: string): string | Buffer | undefined {
  const value = o[inline]
  if (value !== undefined && o[file] !== undefined) {
    throw new InvalidOptionError(`agent.${inline}`, `set either agent.${inline} or agent.${file}, not both`)
  }
  if (value !== undefined) {
    if (!(typeof value === 'string' || Buffer.isBuffer(value)) || value.length === 0) {
      throw new InvalidOptionError(`agent.${inline}`, 'must be a non-empty PEM string or Buffer')
    }
    return value
  }
  const path = o[file] !== undefined ? requireString(o[file], `agent.${file}`) : nonEmpty(env[envName])
  if (path === undefined) return undefined
  const from = o[file] !== undefined ? `agent.${file}` : envName
  return readFile(path, `agent.${file}`, `${from} ("${path}")`)
}

function readFile (path: string, name: string, what: string): Buffer {
  try {
    return readFileSync(path)
  } catch (err) {
    throw new InvalidOptionError(name, `cannot read ${what}: ${(err as Error).message}`, { cause: err })
  }
}

/** The option if given (type-checked), else the variable if set and non-empty. */
function pickString (o: AgentOptions, name: 'address' | 'tlsServerName', env: NodeJS.ProcessEnv,
  envName: string): Source | undefined {
  const value = o[name]
  if (value !== undefined) return { value: requireString(value, `agent.${name}`), from: 'option' }
  const fromEnv = nonEmpty(env[envName])
  return fromEnv === undefined ? undefined : { value: fromEnv, from: envName }
}

/** The spellings Go's strconv.ParseBool accepts, because the same variables feed the consul CLI. */
function envBool (env: NodeJS.ProcessEnv, name: string): boolean | undefined {
  const raw = nonEmpty(env[name])
  if (raw === undefined) return undefined
  if (['1', 't', 'T', 'true', 'TRUE', 'True'].includes(raw)) return true
  if (['0', 'f', 'F', 'false', 'FALSE', 'False'].includes(raw)) return false
  throw new InvalidOptionError(name, `${name} must be true or false, got "${raw}"`)
}

function requireString (value: unknown, name: string): string {
  if (typeof value !== 'string' || value === '') throw new InvalidOptionError(name, 'must be a non-empty string')
  return value
}

/** Go reads an empty variable as unset; so do we. */
function nonEmpty (value: string | undefined): string | undefined {
  return value === undefined || value === '' ? undefined : value
}
