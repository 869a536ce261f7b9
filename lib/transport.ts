// The connection-level side of a decision (docs/semantics.md#transport): `100 Continue` is sent
// only once a request is allowed, and a refused request whose connection would otherwise carry on
// (a body still to come, or an Upgrade socket that no HTTP server manages any more) is closed after
// its answer instead of being drained.
import type { IncomingMessage, ServerResponse } from 'node:http'
import { constants } from 'node:http2'
import type { Http2ServerRequest } from 'node:http2'

const kAwaitingContinue = Symbol('fastify-consul-native.awaitingContinue')

interface ContinueRequest { [kAwaitingContinue]?: true }
interface ServerLike {
  listenerCount (event: string): number
  on (event: string, listener: (...args: any[]) => void): unknown
  emit (event: string, ...args: unknown[]): boolean
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
