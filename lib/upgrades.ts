// Long-lived connections (docs/semantics.md#transport-long-lived): with the option
// `recheckUpgrades`, every allowed Upgrade (a WebSocket) is remembered until its socket closes,
// decided again whenever the intentions, the mesh settings or the certificates change, and closed
// when it would now be refused. Nothing is kept for ordinary requests.
import type { Socket } from 'node:net'
import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import type { ServiceIdentity } from './identity'
import type { RoutePolicy } from './route-policy'
import { logEvent } from './log'

interface OpenUpgrade { readonly request: FastifyRequest, readonly route: RoutePolicy, readonly also: RoutePolicy | null }

/** Whether a request, decided again now, is still allowed. */
export type Redecide = (request: FastifyRequest, route: RoutePolicy) => boolean | Promise<boolean>

export class UpgradeTracker {
  readonly #open = new Map<Socket, OpenUpgrade>()
  readonly #log: FastifyBaseLogger

  constructor (log: FastifyBaseLogger) {
    this.#log = log
  }

  /**
   * Remembers an allowed request if it is an Upgrade (Node set `upgrade`, absent from its types),
   * until its socket closes. `also`: a second policy it must keep passing (docs/semantics.md#transport-upgrades).
   */
  trackIfUpgrade (request: FastifyRequest, route: RoutePolicy, also: RoutePolicy | null = null): void {
    if ((request.raw as { upgrade?: boolean }).upgrade !== true) return
    const socket = request.raw.socket
    this.#open.set(socket, { request, route, also })
    socket.once('close', () => this.#open.delete(socket))
  }

  /** Decides every tracked connection again and closes those refused now; resolves with how many were closed. */
  async recheck (redecide: Redecide): Promise<number> {
    let closed = 0
    for (const [socket, { request, route, also }] of [...this.#open]) {
      if (await redecide(request, route) && (also === null || await redecide(request, also))) continue
      // No identity: a caller shadow mode served unauthenticated, now refused with a 400 (its
      // certificate verifies after a roots change, and a header is rejected).
      const source = (request.consulSource as ServiceIdentity | null)?.uri ?? null
      logEvent(this.#log, 'info', 'upgrade-revoked', { source, path: request.raw.url }, 'closing an upgraded connection that is no longer allowed')
      this.#open.delete(socket)
      socket.destroy()
      closed++
    }
    return closed
  }
}
