// Clients that send exactly the bytes a test asks for, over real mTLS sockets: HTTP/1.1 text
// (repeated headers, Expect, Upgrade, bodies cut short) and HTTP/2 frames with a minimal HPACK
// encoder (node:http2 refuses to send a single-valued header twice).
import { once } from 'node:events'
import tls from 'node:tls'
import type { TLSSocket } from 'node:tls'
import type { Credentials, Tap } from './mesh'

export interface RawResponse {
  status: number
  headers: Record<string, string>
  body: string
}

/** An mTLS socket to 127.0.0.1:port (ALPN as given), closed at teardown. */
export async function rawSocket (t: Tap, port: number, creds: Partial<Credentials> & { ca: string[] }, alpn = 'http/1.1'): Promise<TLSSocket> {
  const socket = tls.connect({ host: '127.0.0.1', port, ...creds, ALPNProtocols: [alpn], checkServerIdentity: () => undefined })
  socket.on('error', () => {}) // a reset after a refusal is what some tests expect
  t.teardown(() => { socket.destroy() })
  await once(socket, 'secureConnect')
  return socket
}

/** Collects what the server sends, and parses HTTP/1.1 responses out of it as they complete. */
export class Http1Reader {
  #buffer = ''
  #waiters: Array<() => void> = []
  closed = false

  constructor (socket: TLSSocket) {
    socket.setEncoding('latin1')
    socket.on('data', (chunk: string) => { this.#buffer += chunk; this.#wake() })
    socket.on('close', () => { this.closed = true; this.#wake() })
  }

  /** Everything received so far and not yet returned as a response. */
  get pending (): string { return this.#buffer }

  /** The next complete response (an interim `100 Continue` counts as one); throws if the connection closes first. */
  async response (): Promise<RawResponse> {
    for (;;) {
      const parsed = parseResponse(this.#buffer)
      if (parsed !== null) {
        this.#buffer = this.#buffer.slice(parsed.length)
        return parsed.response
      }
      if (this.closed) throw new Error(`connection closed before a complete response: ${JSON.stringify(this.#buffer)}`)
      await new Promise<void>((resolve) => this.#waiters.push(resolve))
    }
  }

  /** Resolves once the server has closed the connection. */
  async closedByServer (): Promise<void> {
    while (!this.closed) await new Promise<void>((resolve) => this.#waiters.push(resolve))
  }

  #wake (): void {
    const waiters = this.#waiters
    this.#waiters = []
    for (const wake of waiters) wake()
  }
}

function parseResponse (buffer: string): { response: RawResponse, length: number } | null {
  const end = buffer.indexOf('\r\n\r\n')
  if (end === -1) return null
  const [statusLine, ...lines] = buffer.slice(0, end).split('\r\n')
  const status = Number((statusLine as string).split(' ')[1])
  const headers: Record<string, string> = {}
  for (const line of lines) {
    const colon = line.indexOf(':')
    headers[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim()
  }
  const length = status === 100 || status === 101 ? 0 : Number(headers['content-length'] ?? 0)
  if (buffer.length < end + 4 + length) return null
  return { response: { status, headers, body: buffer.slice(end + 4, end + 4 + length) }, length: end + 4 + length }
}

/** One HTTP/1.1 request as raw text on a new connection; the response and whether the server then closed. */
export async function http1 (t: Tap, port: number, creds: Partial<Credentials> & { ca: string[] }, text: string): Promise<{ response: RawResponse, socket: TLSSocket, reader: Http1Reader }> {
  const socket = await rawSocket(t, port, creds)
  const reader = new Http1Reader(socket)
  socket.write(text)
  return { response: await reader.response(), socket, reader }
}

// ---- HTTP/2 ----

const PREFACE = 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'
const DATA = 0
const HEADERS = 1
const RST_STREAM = 3
const SETTINGS = 4
const GOAWAY = 7

function frame (type: number, flags: number, stream: number, payload: Buffer): Buffer {
  const head = Buffer.alloc(9)
  head.writeUIntBE(payload.length, 0, 3)
  head[3] = type
  head[4] = flags
  head.writeUInt32BE(stream, 5)
  return Buffer.concat([head, payload])
}

/** HPACK integer with a 7-bit prefix (RFC 7541 §5.1). */
function hpackInt (value: number): number[] {
  if (value < 127) return [value]
  const out = [127]
  value -= 127
  while (value >= 128) { out.push((value & 127) | 128); value >>= 7 }
  out.push(value)
  return out
}

/** Literal header fields without indexing, new names, no Huffman (RFC 7541 §6.2.2): any list, repeats included. */
function hpack (fields: Array<[string, string]>): Buffer {
  const bytes: number[] = []
  for (const [name, value] of fields) {
    bytes.push(0)
    for (const s of [name, value]) {
      const b = Buffer.from(s, 'latin1')
      bytes.push(...hpackInt(b.length), ...b)
    }
  }
  return Buffer.from(bytes)
}

export interface RawH2Result {
  /** The response body (DATA frames of stream 1). */
  body: string
  /** The RST_STREAM error code the server sent for stream 1, if any. */
  reset: number | null
}

/**
 * One HTTP/2 request on a new connection with exactly `fields` as its header block (stream 1,
 * END_STREAM); resolves when the server ends or resets the stream.
 */
export async function http2Raw (t: Tap, port: number, creds: Partial<Credentials> & { ca: string[] }, fields: Array<[string, string]>): Promise<RawH2Result> {
  const socket = await rawSocket(t, port, creds, 'h2')
  socket.write(PREFACE)
  socket.write(frame(SETTINGS, 0, 0, Buffer.alloc(0)))
  socket.write(frame(HEADERS, 0x5, 1, hpack(fields)))
  let buffer = Buffer.alloc(0)
  let body = ''
  return await new Promise((resolve, reject) => {
    socket.on('close', () => reject(new Error('connection closed before stream 1 ended')))
    socket.on('data', (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk])
      while (buffer.length >= 9) {
        const length = buffer.readUIntBE(0, 3)
        if (buffer.length < 9 + length) break
        const [type, flags] = [buffer[3] as number, buffer[4] as number]
        const stream = buffer.readUInt32BE(5) & 0x7fffffff
        const payload = buffer.subarray(9, 9 + length)
        buffer = buffer.subarray(9 + length)
        if (type === SETTINGS && (flags & 1) === 0) socket.write(frame(SETTINGS, 1, 0, Buffer.alloc(0)))
        if (type === GOAWAY) reject(new Error(`GOAWAY ${payload.readUInt32BE(4)}`))
        if (stream !== 1) continue
        if (type === DATA) body += payload.toString('latin1')
        if (type === RST_STREAM) resolve({ body, reset: payload.readUInt32BE(0) })
        else if ((type === DATA || type === HEADERS) && (flags & 1) !== 0) resolve({ body, reset: null })
      }
    })
  })
}
