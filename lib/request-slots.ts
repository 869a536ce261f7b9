// The request decorations (`consulSource`, `consulDecision`, `consulJwt`): prototype accessors
// over symbol slots, null until the plugin sets them.
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { RequestTokens } from './jwt/request-tokens'

const kSource = Symbol('fastify-consul-native.consulSource')
const kDecision = Symbol('fastify-consul-native.consulDecision')
const kJwt = Symbol('fastify-consul-native.consulJwt')
interface RequestSlots {
  [kSource]?: FastifyRequest['consulSource']
  [kDecision]?: FastifyRequest['consulDecision']
  /** The verified payloads, or the tokens they are built from on first read. */
  [kJwt]?: FastifyRequest['consulJwt'] | RequestTokens
}
type Slotted = FastifyRequest & RequestSlots

/**
 * Fastify copies value decorations into every new request at one keyed store site for every
 * name, which is megamorphic: those three copies cost more instructions than the decision
 * (bench/instructions.js). An accessor costs nothing until used. One literal per name on
 * purpose: closures of one literal share their inline caches, and a store site that sees three
 * keys is megamorphic again.
 */
export function decorateRequestSlots (fastify: FastifyInstance): void {
  fastify.decorateRequest('consulSource', {
    getter (this: Slotted) { return this[kSource] ?? null },
    setter (this: Slotted, value: FastifyRequest['consulSource']) { this[kSource] = value }
  })
  fastify.decorateRequest('consulDecision', {
    getter (this: Slotted) { return this[kDecision] ?? null },
    setter (this: Slotted, value: FastifyRequest['consulDecision']) { this[kDecision] = value }
  })
  fastify.decorateRequest('consulJwt', {
    getter (this: Slotted) {
      const value = this[kJwt]
      if (value instanceof RequestTokens) return (this[kJwt] = value.verified())
      return value ?? null
    },
    setter (this: Slotted, value: FastifyRequest['consulJwt']) { this[kJwt] = value }
  })
}

/**
 * Gives an allowed request its tokens: `request.consulJwt` builds the payloads object from them
 * when it is first read, so a handler that never reads it costs no object per request.
 */
export function setRequestTokens (request: FastifyRequest, tokens: RequestTokens): void {
  (request as Slotted)[kJwt] = tokens
}
