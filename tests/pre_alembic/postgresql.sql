-- Made by odpo 8b66a49 (before Alembic) with tests/pre_alembic/make_dumps.py
--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: _odpo_migrations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public._odpo_migrations (
    name character varying(200) NOT NULL,
    applied_at timestamp without time zone
);


--
-- Name: adapters; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.adapters (
    id integer NOT NULL,
    run character varying(100) NOT NULL,
    version integer NOT NULL,
    path text NOT NULL,
    parent integer,
    step integer NOT NULL,
    rolled_back boolean NOT NULL,
    created_at timestamp without time zone NOT NULL,
    metrics json NOT NULL
);


--
-- Name: adapters_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.adapters_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: adapters_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.adapters_id_seq OWNED BY public.adapters.id;


--
-- Name: assignments; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.assignments (
    id integer NOT NULL,
    pair_id integer NOT NULL,
    labeler character varying(200) NOT NULL,
    shown_left character varying(1) NOT NULL,
    shown_at timestamp without time zone NOT NULL,
    expires_at timestamp without time zone NOT NULL,
    state character varying(10) NOT NULL
);


--
-- Name: assignments_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.assignments_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: assignments_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.assignments_id_seq OWNED BY public.assignments.id;


--
-- Name: control; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.control (
    key character varying(100) NOT NULL,
    value json NOT NULL,
    updated_at timestamp without time zone NOT NULL
);


--
-- Name: evals; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.evals (
    id integer NOT NULL,
    version_a integer NOT NULL,
    version_b integer NOT NULL,
    judge character varying(200) NOT NULL,
    n integer NOT NULL,
    wins integer NOT NULL,
    losses integer NOT NULL,
    ties integer NOT NULL,
    win_rate double precision NOT NULL,
    ci_low double precision NOT NULL,
    ci_high double precision NOT NULL,
    details json NOT NULL,
    created_at timestamp without time zone NOT NULL
);


--
-- Name: evals_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.evals_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: evals_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.evals_id_seq OWNED BY public.evals.id;


--
-- Name: labelers; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.labelers (
    id integer NOT NULL,
    name character varying(200) NOT NULL,
    is_admin boolean NOT NULL,
    created_at timestamp without time zone NOT NULL
);


--
-- Name: labelers_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.labelers_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: labelers_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.labelers_id_seq OWNED BY public.labelers.id;


--
-- Name: labels; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.labels (
    id integer NOT NULL,
    pair_id integer NOT NULL,
    choice character varying(10) NOT NULL,
    shown_left character varying(1),
    labeler character varying(200) NOT NULL,
    source character varying(200) NOT NULL,
    judge_confidence double precision,
    reason text,
    shown_at timestamp without time zone,
    answered_at timestamp without time zone NOT NULL,
    consumed_version integer,
    consumed_step integer,
    undone boolean NOT NULL
);


--
-- Name: labels_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.labels_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: labels_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.labels_id_seq OWNED BY public.labels.id;


--
-- Name: pairs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.pairs (
    id integer NOT NULL,
    prompt_id integer NOT NULL,
    sample_a_id integer NOT NULL,
    sample_b_id integer NOT NULL,
    created_version integer NOT NULL,
    status character varying(10) NOT NULL,
    labels_wanted integer NOT NULL,
    claims integer NOT NULL,
    purpose character varying(20) NOT NULL,
    requested_by character varying(200),
    created_at timestamp without time zone NOT NULL
);


--
-- Name: pairs_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.pairs_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: pairs_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.pairs_id_seq OWNED BY public.pairs.id;


--
-- Name: prompts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.prompts (
    id integer NOT NULL,
    text text NOT NULL,
    text_hash character varying(64) NOT NULL,
    source character varying(200) NOT NULL,
    tags json NOT NULL,
    held_out boolean NOT NULL,
    times_sampled integer NOT NULL,
    last_sampled_at timestamp without time zone,
    created_at timestamp without time zone NOT NULL
);


--
-- Name: prompts_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.prompts_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: prompts_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.prompts_id_seq OWNED BY public.prompts.id;


--
-- Name: reloads; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.reloads (
    id integer NOT NULL,
    version integer NOT NULL,
    swap_ms double precision NOT NULL,
    commit_to_serving_ms double precision NOT NULL,
    retired_pairs integer NOT NULL,
    created_at timestamp without time zone NOT NULL
);


--
-- Name: reloads_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.reloads_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: reloads_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.reloads_id_seq OWNED BY public.reloads.id;


--
-- Name: samples; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.samples (
    id integer NOT NULL,
    prompt_id integer NOT NULL,
    adapter_version integer NOT NULL,
    text text NOT NULL,
    tokens integer NOT NULL,
    finish_reason character varying(20) NOT NULL,
    params json NOT NULL,
    gen_seconds double precision NOT NULL,
    created_at timestamp without time zone NOT NULL
);


--
-- Name: samples_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.samples_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: samples_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.samples_id_seq OWNED BY public.samples.id;


--
-- Name: train_steps; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.train_steps (
    id integer NOT NULL,
    run character varying(100) NOT NULL,
    step integer NOT NULL,
    version integer NOT NULL,
    label_ids json NOT NULL,
    metrics json NOT NULL,
    loss double precision NOT NULL,
    reward_accuracy double precision NOT NULL,
    reward_margin double precision NOT NULL,
    kl double precision NOT NULL,
    grad_norm double precision NOT NULL,
    seconds double precision NOT NULL,
    version_lag double precision NOT NULL,
    committed boolean NOT NULL,
    created_at timestamp without time zone NOT NULL
);


--
-- Name: train_steps_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.train_steps_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: train_steps_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.train_steps_id_seq OWNED BY public.train_steps.id;


--
-- Name: adapters id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.adapters ALTER COLUMN id SET DEFAULT nextval('public.adapters_id_seq'::regclass);


--
-- Name: assignments id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.assignments ALTER COLUMN id SET DEFAULT nextval('public.assignments_id_seq'::regclass);


--
-- Name: evals id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.evals ALTER COLUMN id SET DEFAULT nextval('public.evals_id_seq'::regclass);


--
-- Name: labelers id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labelers ALTER COLUMN id SET DEFAULT nextval('public.labelers_id_seq'::regclass);


--
-- Name: labels id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labels ALTER COLUMN id SET DEFAULT nextval('public.labels_id_seq'::regclass);


--
-- Name: pairs id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.pairs ALTER COLUMN id SET DEFAULT nextval('public.pairs_id_seq'::regclass);


--
-- Name: prompts id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.prompts ALTER COLUMN id SET DEFAULT nextval('public.prompts_id_seq'::regclass);


--
-- Name: reloads id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.reloads ALTER COLUMN id SET DEFAULT nextval('public.reloads_id_seq'::regclass);


--
-- Name: samples id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.samples ALTER COLUMN id SET DEFAULT nextval('public.samples_id_seq'::regclass);


--
-- Name: train_steps id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.train_steps ALTER COLUMN id SET DEFAULT nextval('public.train_steps_id_seq'::regclass);


--
-- Data for Name: _odpo_migrations; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public._odpo_migrations VALUES ('m001_initial', '2026-11-29 11:14:30.786645');


--
-- Data for Name: adapters; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.adapters VALUES (1, 'default', 1, 'runs/default/adapters/v1', 0, 1, false, '2026-11-29 11:14:30.936671', '{"loss": 0.69}');


--
-- Data for Name: assignments; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.assignments VALUES (1, 1, 'ada', 'a', '2026-11-29 11:14:30.868853', '2026-11-29 11:24:30.868853', 'answered');
INSERT INTO public.assignments VALUES (2, 2, 'ada', 'a', '2026-11-29 11:14:30.903061', '2026-11-29 11:24:30.903061', 'answered');
INSERT INTO public.assignments VALUES (3, 3, 'ada', 'b', '2026-11-29 11:14:30.91891', '2026-11-29 11:24:30.91891', 'answered');


--
-- Data for Name: control; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.control VALUES ('training', '{"paused": false}', '2026-11-29 11:14:30.953098');


--
-- Data for Name: evals; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.evals VALUES (1, 1, 0, 'rule:short', 10, 6, 3, 1, 0.65, 0.36, 0.86, '{"prompts": 10}', '2026-11-29 11:14:30.945736');


--
-- Data for Name: labelers; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.labelers VALUES (1, 'ada', true, '2026-11-29 11:14:30.82455');


--
-- Data for Name: labels; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.labels VALUES (3, 3, 'tie', 'b', 'ada', 'human', NULL, NULL, '2026-11-29 11:14:30.91891', '2026-11-29 11:14:30.924667', NULL, NULL, false);
INSERT INTO public.labels VALUES (4, 1, 'b', NULL, 'rule-judge', 'judge:rule:short', 0.75, NULL, NULL, '2026-11-29 11:14:30.929948', NULL, NULL, false);
INSERT INTO public.labels VALUES (1, 1, 'a', 'a', 'ada', 'human', NULL, NULL, '2026-11-29 11:14:30.868853', '2026-11-29 11:14:30.88571', 1, 1, false);
INSERT INTO public.labels VALUES (2, 2, 'b', 'a', 'ada', 'human', NULL, NULL, '2026-11-29 11:14:30.903061', '2026-11-29 11:14:30.908882', 1, 1, false);


--
-- Data for Name: pairs; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.pairs VALUES (4, 4, 7, 8, 0, 'queued', 1, 0, 'train', NULL, '2026-11-29 11:14:30.853883');
INSERT INTO public.pairs VALUES (1, 1, 1, 2, 0, 'labeled', 1, 1, 'train', NULL, '2026-11-29 11:14:30.843232');
INSERT INTO public.pairs VALUES (2, 2, 3, 4, 0, 'labeled', 1, 1, 'train', NULL, '2026-11-29 11:14:30.848002');
INSERT INTO public.pairs VALUES (3, 3, 5, 6, 0, 'labeled', 1, 1, 'train', NULL, '2026-11-29 11:14:30.851034');


--
-- Data for Name: prompts; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.prompts VALUES (5, 'Held-out prompt', '446dacedab5b05dc52baa79fd45a02e9e2303073b0f5fcc00f1d66df0c480eb5', 'starter', '[]', true, 0, NULL, '2026-11-29 11:14:30.819477');
INSERT INTO public.prompts VALUES (1, 'Name a colour, 0', '67d6fdff24983b7866203fe6e790d1a7eec3d211b4b0605e0926a447e884766f', 'import', '["colours"]', false, 1, '2026-11-29 11:14:30.83211', '2026-11-29 11:14:30.819443');
INSERT INTO public.prompts VALUES (2, 'Name a colour, 1', 'cbc1f667cec0928d382d09d9222bf3614e9a00c339d91a6e6b28c0945b0b80a6', 'import', '["colours"]', false, 1, '2026-11-29 11:14:30.83211', '2026-11-29 11:14:30.81946');
INSERT INTO public.prompts VALUES (3, 'Name a colour, 2', 'f776e4d823cf707fd3dc93b3c63a0c74d5372f9c4111cab49a9bb692557950f1', 'import', '["colours"]', false, 1, '2026-11-29 11:14:30.83211', '2026-11-29 11:14:30.819468');
INSERT INTO public.prompts VALUES (4, 'Name a colour, 3', 'c97b6637ff9eae7ce6804d3042e0f5310d14ac6247884ce47c9cd42aaa59b55d', 'import', '["colours"]', false, 1, '2026-11-29 11:14:30.83211', '2026-11-29 11:14:30.819473');


--
-- Data for Name: reloads; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.reloads VALUES (1, 1, 12.5, 340, 1, '2026-11-29 11:14:30.94875');


--
-- Data for Name: samples; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.samples VALUES (1, 1, 0, 'red 1', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.838685');
INSERT INTO public.samples VALUES (2, 1, 0, 'blue 1', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.838703');
INSERT INTO public.samples VALUES (3, 2, 0, 'red 2', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.846143');
INSERT INTO public.samples VALUES (4, 2, 0, 'blue 2', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.846158');
INSERT INTO public.samples VALUES (5, 3, 0, 'red 3', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.849482');
INSERT INTO public.samples VALUES (6, 3, 0, 'blue 3', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.849493');
INSERT INTO public.samples VALUES (7, 4, 0, 'red 4', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.852473');
INSERT INTO public.samples VALUES (8, 4, 0, 'blue 4', 2, 'stop', '{"temperature": 0.8}', 0.25, '2026-11-29 11:14:30.852485');


--
-- Data for Name: train_steps; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.train_steps VALUES (1, 'default', 1, 1, '[1, 2]', '{"loss": 0.69, "reward_accuracy": 0.5, "kl": 0.01}', 0.69, 0.5, 0, 0.01, 0, 0, 0, true, '2026-11-29 11:14:30.933342');


--
-- Name: adapters_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.adapters_id_seq', 1, true);


--
-- Name: assignments_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.assignments_id_seq', 3, true);


--
-- Name: evals_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.evals_id_seq', 1, true);


--
-- Name: labelers_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.labelers_id_seq', 1, true);


--
-- Name: labels_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.labels_id_seq', 4, true);


--
-- Name: pairs_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.pairs_id_seq', 4, true);


--
-- Name: prompts_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.prompts_id_seq', 5, true);


--
-- Name: reloads_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.reloads_id_seq', 1, true);


--
-- Name: samples_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.samples_id_seq', 8, true);


--
-- Name: train_steps_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.train_steps_id_seq', 1, true);


--
-- Name: _odpo_migrations _odpo_migrations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public._odpo_migrations
    ADD CONSTRAINT _odpo_migrations_pkey PRIMARY KEY (name);


--
-- Name: adapters adapters_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.adapters
    ADD CONSTRAINT adapters_pkey PRIMARY KEY (id);


--
-- Name: assignments assignments_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.assignments
    ADD CONSTRAINT assignments_pkey PRIMARY KEY (id);


--
-- Name: control control_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.control
    ADD CONSTRAINT control_pkey PRIMARY KEY (key);


--
-- Name: evals evals_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.evals
    ADD CONSTRAINT evals_pkey PRIMARY KEY (id);


--
-- Name: labelers labelers_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labelers
    ADD CONSTRAINT labelers_name_key UNIQUE (name);


--
-- Name: labelers labelers_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labelers
    ADD CONSTRAINT labelers_pkey PRIMARY KEY (id);


--
-- Name: labels labels_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labels
    ADD CONSTRAINT labels_pkey PRIMARY KEY (id);


--
-- Name: pairs pairs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.pairs
    ADD CONSTRAINT pairs_pkey PRIMARY KEY (id);


--
-- Name: prompts prompts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.prompts
    ADD CONSTRAINT prompts_pkey PRIMARY KEY (id);


--
-- Name: prompts prompts_text_hash_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.prompts
    ADD CONSTRAINT prompts_text_hash_key UNIQUE (text_hash);


--
-- Name: reloads reloads_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.reloads
    ADD CONSTRAINT reloads_pkey PRIMARY KEY (id);


--
-- Name: samples samples_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.samples
    ADD CONSTRAINT samples_pkey PRIMARY KEY (id);


--
-- Name: train_steps train_steps_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.train_steps
    ADD CONSTRAINT train_steps_pkey PRIMARY KEY (id);


--
-- Name: adapters uq_adapter_run_version; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.adapters
    ADD CONSTRAINT uq_adapter_run_version UNIQUE (run, version);


--
-- Name: assignments uq_assignment_pair_labeler; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.assignments
    ADD CONSTRAINT uq_assignment_pair_labeler UNIQUE (pair_id, labeler);


--
-- Name: ix_assignments_pair_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_assignments_pair_id ON public.assignments USING btree (pair_id);


--
-- Name: ix_labels_consumed_version; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_labels_consumed_version ON public.labels USING btree (consumed_version);


--
-- Name: ix_labels_pair_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_labels_pair_id ON public.labels USING btree (pair_id);


--
-- Name: ix_pairs_prompt_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_pairs_prompt_id ON public.pairs USING btree (prompt_id);


--
-- Name: ix_pairs_status_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_pairs_status_id ON public.pairs USING btree (status, id);


--
-- Name: ix_prompts_held_out; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_prompts_held_out ON public.prompts USING btree (held_out);


--
-- Name: ix_samples_prompt_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_samples_prompt_id ON public.samples USING btree (prompt_id);


--
-- Name: assignments assignments_pair_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.assignments
    ADD CONSTRAINT assignments_pair_id_fkey FOREIGN KEY (pair_id) REFERENCES public.pairs(id);


--
-- Name: labels labels_pair_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labels
    ADD CONSTRAINT labels_pair_id_fkey FOREIGN KEY (pair_id) REFERENCES public.pairs(id);


--
-- Name: pairs pairs_prompt_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.pairs
    ADD CONSTRAINT pairs_prompt_id_fkey FOREIGN KEY (prompt_id) REFERENCES public.prompts(id);


--
-- Name: pairs pairs_sample_a_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.pairs
    ADD CONSTRAINT pairs_sample_a_id_fkey FOREIGN KEY (sample_a_id) REFERENCES public.samples(id);


--
-- Name: pairs pairs_sample_b_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.pairs
    ADD CONSTRAINT pairs_sample_b_id_fkey FOREIGN KEY (sample_b_id) REFERENCES public.samples(id);


--
-- Name: samples samples_prompt_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.samples
    ADD CONSTRAINT samples_prompt_id_fkey FOREIGN KEY (prompt_id) REFERENCES public.prompts(id);


--
-- PostgreSQL database dump complete
--


