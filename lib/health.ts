// The exempt health route Consul's HTTP check calls (no client certificate): readiness facts only,
// nothing about certificates or intentions, and the enforcement mode without route names
// (docs/semantics.md#rollout-status).
import type { FastifyInstance } from 'fastify'
import type { ConsulSync } from './sync'

export function addHealthRoute (fastify: FastifyInstance, url: string, sync: ConsulSync): void {
  fastify.get(url, { config: { consulNative: false } }, async function consulNativeHealth (_request, reply) {
    const status = sync.status()
    reply.code(status.ready ? 200 : 503)
    const enforcement = Object.keys(status.enforcement.routes).length > 0 ? 'mixed' : status.enforcement.mode
    return { status: status.ready ? 'passing' : 'critical', service: status.service, registered: status.registration?.registered ?? null, enforcement }
  })
}
