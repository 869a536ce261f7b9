// The open-upgrade tracker on its own (docs/semantics.md#transport-long-lived).
import t from 'tap'
import { EventEmitter } from 'node:events'
import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import { SERVICE_POLICY } from '../lib/route-policy'
import { UpgradeTracker } from '../lib/upgrades'

t.test('a refused connection is closed and logged, with or without a caller identity', async (t) => {
  const logged: Array<Record<string, unknown>> = []
  const log = { info: (obj: Record<string, unknown>) => logged.push(obj), debug: () => {}, warn: () => {}, error: () => {} } as unknown as FastifyBaseLogger
  const tracker = new UpgradeTracker(log)
  const open = (source: { uri: string } | null): EventEmitter & { destroyed: boolean } => {
    const socket: EventEmitter & { destroyed: boolean, destroy: () => void } = Object.assign(new EventEmitter(), {
      destroyed: false,
      destroy: () => { socket.destroyed = true; socket.emit('close') }
    })
    tracker.trackIfUpgrade({ raw: { upgrade: true, socket, url: '/ws' }, consulSource: source } as unknown as FastifyRequest, SERVICE_POLICY)
    return socket
  }
  const known = open({ uri: 'spiffe://td/ns/default/dc/dc1/svc/web' })
  const unknown = open(null)
  tracker.trackIfUpgrade({ raw: { upgrade: false } } as unknown as FastifyRequest, SERVICE_POLICY)
  t.equal(await tracker.recheck(() => false), 2, 'both refused, both closed')
  t.ok(known.destroyed && unknown.destroyed)
  t.match(logged.map((l) => (l.consulNative as { source?: unknown }).source), ['spiffe://td/ns/default/dc/dc1/svc/web', null], 'the one without an identity is logged with source null')
  t.equal(await tracker.recheck(() => false), 0, 'closed connections are forgotten')
})

t.test('an Upgrade tracked with a second policy stays open only while both allow it', async (t) => {
  const log = { info: () => {}, debug: () => {}, warn: () => {}, error: () => {} } as unknown as FastifyBaseLogger
  const tracker = new UpgradeTracker(log)
  const own = Object.freeze({ exempt: false, override: null, enforcement: 'shadow' as const })
  const socket: EventEmitter & { destroyed: boolean, destroy: () => void } = Object.assign(new EventEmitter(), {
    destroyed: false,
    destroy: () => { socket.destroyed = true; socket.emit('close') }
  })
  tracker.trackIfUpgrade({ raw: { upgrade: true, socket, url: '/plain' }, consulSource: null } as unknown as FastifyRequest, SERVICE_POLICY, own)
  const asked: unknown[] = []
  t.equal(await tracker.recheck((_request, route) => { asked.push(route); return true }), 0, 'both allow: open')
  t.same(asked, [SERVICE_POLICY, own], 'both were asked')
  t.equal(await tracker.recheck((_request, route) => route === SERVICE_POLICY), 1, 'the route\'s own setting refuses now: closed')
  t.ok(socket.destroyed)
})
