// The connection-level side of a decision (docs/semantics.md#transport): `100 Continue` is sent
// only once a request is allowed, a refused request whose connection would otherwise carry on
// (a body still to come, or an Upgrade socket that no HTTP server manages any more) is closed after
// its answer instead of being drained, and Upgrade and CONNECT requests that Node hands to
// listeners of the application's own, outside Fastify, are decided before those listeners see them.
import { STATUS_CODES } from 'node:http'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { constants } from 'node:http2'
import type { Http2ServerRequest } from 'node:http2'
import { DeniedError } from './errors'

const kAwaitingContinue = Symbol('fastify-consul-native.awaitingContinue')

interface ContinueRequest { [kAwaitingContinue]?: true }
interface ServerLike {
  listenerCount (event: string): number
  listeners (event: string): Function[]
  on (event: string, listener: (...args: any[]) => void): unknown
  emit (event: string | symbol, ...args: any[]): boolean
}

/**
 * Makes `server` hand `Expect: 100-continue` requests to its 'request' listeners without sending
 * `100 Continue` (Node sends it first when no 'checkContinue' listener exists); `continueIfAwaited`
 * sends it once the request is allowed. Returns false when the server already has a listener of
 * its own, which then decides when to continue.
 */
export function deferContinue (server: ServerLike): boolean {
  if (server.listenerCount('checkContinue') > 0) return false
  server.on('checkContinue', (req: ContinueRequest, res: unknown) => {
    req[kAwaitingContinue] = true
    server.emit('request', req, res)
  })
  return true
}

/** An allowed request that waits for `100 Continue` gets it now. */
export function continueIfAwaited (raw: object, res: ServerResponse): void {
  if ((raw as ContinueRequest)[kAwaitingContinue] === true) res.writeContinue()
}

/**
 * Called when a request is refused (401, 403, 400), before its answer is sent
 * (docs/semantics.md#transport-close, docs/semantics.md#transport-upgrades). HTTP/1.1: when a
 * body may follow, or the request is an Upgrade whose socket Node no longer manages, the answer
 * says `Connection: close` and the connection ends once it is sent. HTTP/2: when the stream still
 * expects a body, it is reset with NO_ERROR after the answer (RFC 9113 §8.1), so no body is read.
 */
export function closeRefused (raw: IncomingMessage, res: ServerResponse): void {
  if (raw.httpVersionMajor === 2) {
    const stream = (raw as unknown as Http2ServerRequest).stream
    if (!stream.endAfterHeaders) res.once('finish', () => { stream.close(constants.NGHTTP2_NO_ERROR) })
    return
  }
  // Node sets `upgrade` only when it handed the socket to 'upgrade' listeners (absent from its types).
  const upgrade = (raw as { upgrade?: boolean }).upgrade === true
  if (!upgrade && !hasBody(raw)) return
  res.setHeader('connection', 'close')
  // Node's HTTP server ends a `Connection: close` exchange itself; an Upgrade socket it handed
  // over to 'upgrade' listeners is nobody's until it is ended here.
  const socket = raw.socket
  if (upgrade) res.once('finish', () => { socket.destroySoon() })
}

function hasBody (raw: IncomingMessage): boolean {
  const headers = raw.headers
  const length = headers['content-length']
  return headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')
}

/** What the upgrade gate needs of the plugin. */
export interface UpgradeGate {
  /** Whether a listener hands what it gets to Fastify's routing (`@fastify/websocket`'s does). */
  routesThroughFastify (listener: Function): boolean
  /** The error to answer with, or null to hand the request to the listeners. */
  decide (raw: IncomingMessage): Error | null | Promise<Error | null>
}

const kGated = Symbol('fastify-consul-native.upgradeGate')

/**
 * Node hands an Upgrade request to the server's 'upgrade' listeners and a CONNECT to its 'connect'
 * listeners, never to Fastify, as soon as any exists; a listener of the application's own (`ws`
 * attached to the server, a tunnel) would see it without a decision, even from a caller without a
 * certificate. Once the server has such a listener, its `emit` decides these two events first,
 * unless every listener routes them through Fastify (where `onRequest` decides): with the service's
 * policy, as a request no route matches, since no route's handler is what answers it. A refused
 * one is answered on its socket, which is then closed. Other events pass through untouched
 * (docs/semantics.md#transport-upgrades).
 */
export function gateUpgrades (server: ServerLike, gate: UpgradeGate): void {
  const install = (): void => {
    const gated = server as ServerLike & { [kGated]?: true }
    if (gated[kGated] === true) return
    gated[kGated] = true
    const emit = server.emit
    server.emit = function gatedEmit (this: ServerLike, event: string | symbol): boolean {
      // `arguments`, forwarded as given: no array per emitted event.
      if (event !== 'upgrade' && event !== 'connect') return emit.apply(this, arguments as unknown as Parameters<typeof emit>)
      if (server.listeners(event).every((listener) => gate.routesThroughFastify(listener))) return emit.apply(this, arguments as unknown as Parameters<typeof emit>)
      const args = Array.prototype.slice.call(arguments) as Parameters<typeof emit>
      const raw = args[1] as IncomingMessage
      const pass = (err: Error | null): boolean => {
        if (err === null) return emit.apply(this, args)
        refuseOutsideFastify(args[2], err)
        return true
      }
      // The decision neither throws nor rejects; should a bug make it, refuse rather than crash
      // Node's parser (a throw here) or leave the socket hanging.
      let outcome: Error | null | Promise<Error | null>
      try {
        outcome = gate.decide(raw)
      /* c8 ignore next 3 */
      } catch (err) {
        outcome = Object.assign(new DeniedError(), { cause: err })
      }
      if (outcome instanceof Promise) {
        outcome.then(pass, /* c8 ignore next */ (err: unknown) => pass(Object.assign(new DeniedError(), { cause: err })))
        return true
      }
      return pass(outcome)
    }
  }
  if (server.listenerCount('upgrade') > 0 || server.listenerCount('connect') > 0) install()
  server.on('newListener', (event: string | symbol) => { if (event === 'upgrade' || event === 'connect') install() })
}

/**
 * Answers a refused Upgrade or CONNECT outside Fastify, as Fastify would have answered it, and
 * closes its connection: an HTTP/1.1 socket (the listeners' second argument), or an HTTP/2
 * response (a CONNECT stream).
 */
function refuseOutsideFastify (target: unknown, err: Error): void {
  // The enforcer's errors (FST_CONSUL_NATIVE_*) all carry their status.
  const { statusCode: status, code } = err as Error & { statusCode: number, code: string }
  const body = JSON.stringify({ statusCode: status, code, error: STATUS_CODES[status], message: err.message })
  if (typeof (target as { writeHead?: unknown }).writeHead === 'function') {
    (target as ServerResponse).writeHead(status, { 'content-type': 'application/json; charset=utf-8' }).end(body)
    return
  }
  const socket = target as { end: (chunk: string) => void, destroySoon: () => void, on: (event: 'error', fn: () => void) => void }
  // Node took its own error listener off this socket when it handed it over; a caller gone while
  // the decision was made must not turn the write into an uncaught error.
  socket.on('error', () => {})
  socket.end(`HTTP/1.1 ${status} ${STATUS_CODES[status] as string}\r\ncontent-type: application/json; charset=utf-8\r\n` +
    `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`)
  socket.destroySoon()
}
