// A scriptable stand-in for the local Consul agent: a real node:http (or https, or Unix-socket)
// server that records every request and answers with the captured bodies and headers of a real
// agent, or misbehaves on demand (error statuses, garbage, hanging, oversized bodies).
import { execFileSync } from 'node:child_process'
import { EventEmitter, once } from 'node:events'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import http from 'node:http'
import https from 'node:https'
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** Answers of a real Consul 1.10.12 dev agent, kept in the repository (see its README.md). */
export const CAPTURED_DIR = join(__dirname, '..', 'fixtures', 'consul')

export interface CapturedReply { status: number, headers: Record<string, string>, body: string }

/** Headers the test server sets itself (or that describe the capture, not the agent). */
const TRANSPORT_HEADERS = new Set(['date', 'content-length', 'transfer-encoding', 'vary'])

/** A captured answer: `<name>.json` plus `<name>.headers.txt` when it was captured. */
export function captured (name: string, headersFrom = name): CapturedReply {
  const body = readFileSync(join(CAPTURED_DIR, `${name}.json`), 'utf8')
  const headers: Record<string, string> = { 'content-type': 'application/json' }
  let text = ''
  try {
    text = readFileSync(join(CAPTURED_DIR, `${headersFrom}.headers.txt`), 'utf8')
  } catch {
    // Some captures (e.g. after rotation) have no header file; the body alone is the fixture.
  }
  for (const line of text.split('\n').slice(1)) {
    const i = line.indexOf(':')
    if (i <= 0) continue
    const key = line.slice(0, i).trim().toLowerCase()
    if (!TRANSPORT_HEADERS.has(key)) headers[key] = line.slice(i + 1).trim()
  }
  return { status: 200, headers, body }
}

/** The three JSON answers of `agent-authorize.txt`, in order. */
export function capturedAuthorizeBodies (): string[] {
  const text = readFileSync(join(CAPTURED_DIR, 'agent-authorize.txt'), 'utf8')
  return [...text.matchAll(/\n(\{[\s\S]*?\n\})/g)].map((m) => m[1] as string)
}

export interface RecordedRequest {
  method: string
  path: string
  query: URLSearchParams
  headers: IncomingHttpHeaders
  body: string
  /** Resolves when the client goes away before the answer was finished (abort, timeout, close). */
  aborted: Promise<void>
}

export interface Reply {
  status?: number
  headers?: Record<string, string | string[]>
  body?: string | Buffer
  /** Never answer (a blocking query that outlives the client's timeout). */
  hang?: boolean
  /** Send headers, then stall the body forever. */
  stallBody?: boolean
  /** Stream the body in chunks of this many bytes, without Content-Length. */
  chunkSize?: number
  /** Send headers, then a byte of the body every this many milliseconds, for ever. */
  trickleMs?: number
}

export type Handler = (req: RecordedRequest) => Reply | Promise<Reply>

export interface FakeAgentOptions {
  transport?: 'tcp' | 'unix' | 'https'
  tls?: TlsMaterial
  /** https only: ask for (and require) a client certificate. */
  requireClientCert?: boolean
}

export class FakeAgent extends EventEmitter {
  readonly requests: RecordedRequest[] = []
  handler: Handler = () => ({ status: 404, body: 'no handler' })
  readonly origin: string
  readonly socketPath: string | null
  readonly #server: http.Server
  readonly #open = new Set<ServerResponse>()
  readonly #dir: string | null

  private constructor (server: http.Server, origin: string, socketPath: string | null, dir: string | null) {
    super()
    this.#server = server
    this.origin = origin
    this.socketPath = socketPath
    this.#dir = dir
    server.on('request', (req: IncomingMessage, res: ServerResponse) => { this.#handle(req, res).catch((err: unknown) => { res.destroy(err as Error) }) })
  }

  static async start (opts: FakeAgentOptions = {}): Promise<FakeAgent> {
    const transport = opts.transport ?? 'tcp'
    let server: http.Server
    if (transport === 'https') {
      const tls = opts.tls ?? makeTlsMaterial()
      server = https.createServer({
        key: tls.serverKey,
        cert: tls.serverCert,
        ca: tls.ca,
        requestCert: opts.requireClientCert === true,
        rejectUnauthorized: opts.requireClientCert === true
      })
    } else {
      server = http.createServer()
    }
    if (transport === 'unix') {
      const dir = mkdtempSync(join(tmpdir(), 'fake-agent-'))
      const socketPath = join(dir, 'consul.sock')
      server.listen(socketPath)
      await once(server, 'listening')
      return new FakeAgent(server, 'http://localhost', socketPath, dir)
    }
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    const { port } = server.address() as AddressInfo
    return new FakeAgent(server, `${transport === 'https' ? 'https' : 'http'}://127.0.0.1:${port}`, null, null)
  }

  /** Resolves with the next request that arrives. */
  async nextRequest (): Promise<RecordedRequest> {
    const [req] = await once(this, 'request') as [RecordedRequest]
    return req
  }

  async close (): Promise<void> {
    for (const res of this.#open) res.destroy()
    this.#server.closeAllConnections()
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
    if (this.#dir !== null) rmSync(this.#dir, { recursive: true, force: true })
  }

  async #handle (req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = []
    for await (const chunk of req) chunks.push(chunk as Buffer)
    const url = new URL(req.url ?? '/', 'http://agent')
    this.#open.add(res)
    const aborted = new Promise<void>((resolve) => {
      res.on('close', () => {
        this.#open.delete(res)
        if (!res.writableFinished) resolve()
      })
    })
    const recorded: RecordedRequest = {
      method: req.method ?? '',
      path: url.pathname,
      query: url.searchParams,
      headers: req.headers,
      body: Buffer.concat(chunks).toString('utf8'),
      aborted
    }
    this.requests.push(recorded)
    this.emit('request', recorded)
    const reply = await this.handler(recorded)
    if (reply.hang === true) return
    res.statusCode = reply.status ?? 200
    for (const [k, v] of Object.entries(reply.headers ?? {})) res.setHeader(k, v)
    if (reply.stallBody === true) {
      res.flushHeaders()
      res.write('{')
      return
    }
    if (reply.trickleMs !== undefined) {
      res.flushHeaders()
      const timer = setInterval(() => { res.write(' ') }, reply.trickleMs)
      res.once('close', () => { clearInterval(timer) })
      return
    }
    const body = reply.body ?? ''
    if (reply.chunkSize !== undefined) {
      const buf = Buffer.from(body)
      for (let i = 0; i < buf.length && !res.destroyed; i += reply.chunkSize) {
        if (!res.write(buf.subarray(i, i + reply.chunkSize))) await once(res, 'drain').catch(() => {})
      }
      res.end()
      return
    }
    res.end(body)
  }
}

/** Replies in order, then repeats the last one. */
export function sequence (...replies: Array<Reply | (() => Reply)>): Handler {
  let i = 0
  return () => {
    const r = replies[Math.min(i++, replies.length - 1)] as Reply | (() => Reply)
    return typeof r === 'function' ? r() : r
  }
}

export interface TlsMaterial {
  ca: string
  serverCert: string
  serverKey: string
  clientCert: string
  clientKey: string
  /** Paths of the same PEMs, for the *File options. */
  files: { ca: string, clientCert: string, clientKey: string }
}

let cachedTls: TlsMaterial | undefined

/**
 * A throwaway CA with a server certificate (localhost, 127.0.0.1) and a client certificate, made
 * with the openssl CLI rather than lib/dev-agent/ca.ts: that CA issues no IP SANs, and loading it
 * here would hold these tests to its 100% coverage as well.
 */
export function makeTlsMaterial (): TlsMaterial {
  if (cachedTls !== undefined) return cachedTls
  const dir = mkdtempSync(join(tmpdir(), 'agent-tls-'))
  const f = (name: string): string => join(dir, name)
  const ssl = (...args: string[]): void => { execFileSync('openssl', args, { stdio: 'pipe' }) }
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes']
  ssl('req', '-x509', ...ec, '-keyout', f('ca.key'), '-out', f('ca.pem'), '-days', '2', '-subj', '/CN=fake agent CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
  for (const [name, ext] of [
    ['server', 'subjectAltName=DNS:localhost,DNS:consul.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n'],
    ['client', 'extendedKeyUsage=clientAuth\n']
  ] as const) {
    writeFileSync(f(`${name}.ext`), ext)
    ssl('req', ...ec, '-keyout', f(`${name}.key`), '-out', f(`${name}.csr`), '-subj', `/CN=${name}`)
    ssl('x509', '-req', '-in', f(`${name}.csr`), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial',
      '-days', '2', '-extfile', f(`${name}.ext`), '-out', f(`${name}.pem`))
  }
  const read = (name: string): string => readFileSync(f(name), 'utf8')
  cachedTls = {
    ca: read('ca.pem'),
    serverCert: read('server.pem'),
    serverKey: read('server.key'),
    clientCert: read('client.pem'),
    clientKey: read('client.key'),
    files: { ca: f('ca.pem'), clientCert: f('client.pem'), clientKey: f('client.key') }
  }
  return cachedTls
}

/** One line: `obj` as written, `event` and `fields` its `consulNative` part (lib/log.ts). */
export interface LogCall { level: 'warn' | 'error' | 'info' | 'debug', obj: Record<string, unknown>, msg: string, event: unknown, fields: Record<string, unknown> }

/** A WatchLogger that records every call and emits `log` (and `log:<level>`) so tests can wait on it. */
export class RecordingLogger extends EventEmitter {
  readonly calls: LogCall[] = []
  warn (obj: object, msg: string): void { this.#record('warn', obj, msg) }
  error (obj: object, msg: string): void { this.#record('error', obj, msg) }
  info (obj: object, msg: string): void { this.#record('info', obj, msg) }
  debug (obj: object, msg: string): void { this.#record('debug', obj, msg) }

  at (level: LogCall['level']): LogCall[] {
    return this.calls.filter((c) => c.level === level)
  }

  /** Resolves with the next call at `level`. */
  async next (level: LogCall['level']): Promise<LogCall> {
    const [call] = await once(this, `log:${level}`) as [LogCall]
    return call
  }

  #record (level: LogCall['level'], obj: object, msg: string): void {
    const fields = ((obj as { consulNative?: Record<string, unknown> }).consulNative ?? {})
    const call = { level, obj: obj as Record<string, unknown>, msg, event: fields.event, fields }
    this.calls.push(call)
    this.emit('log', call)
    this.emit(`log:${level}`, call)
  }
}
