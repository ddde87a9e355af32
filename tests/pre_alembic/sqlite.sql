-- Made by odpo 8b66a49 (before Alembic) with tests/pre_alembic/make_dumps.py
BEGIN TRANSACTION;
CREATE TABLE _odpo_migrations (
	name VARCHAR(200) NOT NULL, 
	applied_at DATETIME, 
	PRIMARY KEY (name)
);
INSERT INTO "_odpo_migrations" VALUES('m001_initial','2026-11-29 11:14:29.633803');
CREATE TABLE adapters (
	id INTEGER NOT NULL, 
	run VARCHAR(100) NOT NULL, 
	version INTEGER NOT NULL, 
	path TEXT NOT NULL, 
	parent INTEGER, 
	step INTEGER NOT NULL, 
	rolled_back BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	metrics JSON NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_adapter_run_version UNIQUE (run, version)
);
INSERT INTO "adapters" VALUES(1,'default',1,'runs/default/adapters/v1',0,1,0,'2026-11-29 11:14:29.694606','{"loss": 0.69}');
CREATE TABLE assignments (
	id INTEGER NOT NULL, 
	pair_id INTEGER NOT NULL, 
	labeler VARCHAR(200) NOT NULL, 
	shown_left VARCHAR(1) NOT NULL, 
	shown_at DATETIME NOT NULL, 
	expires_at DATETIME NOT NULL, 
	state VARCHAR(10) NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_assignment_pair_labeler UNIQUE (pair_id, labeler), 
	FOREIGN KEY(pair_id) REFERENCES pairs (id)
);
INSERT INTO "assignments" VALUES(1,1,'ada','a','2026-11-29 11:14:29.667568','2026-11-29 11:24:29.667568','answered');
INSERT INTO "assignments" VALUES(2,2,'ada','b','2026-11-29 11:14:29.680907','2026-11-29 11:24:29.680907','answered');
INSERT INTO "assignments" VALUES(3,3,'ada','b','2026-11-29 11:14:29.686323','2026-11-29 11:24:29.686323','answered');
CREATE TABLE control (
	"key" VARCHAR(100) NOT NULL, 
	value JSON NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "control" VALUES('training','{"paused": false}','2026-11-29 11:14:29.702826');
CREATE TABLE evals (
	id INTEGER NOT NULL, 
	version_a INTEGER NOT NULL, 
	version_b INTEGER NOT NULL, 
	judge VARCHAR(200) NOT NULL, 
	n INTEGER NOT NULL, 
	wins INTEGER NOT NULL, 
	losses INTEGER NOT NULL, 
	ties INTEGER NOT NULL, 
	win_rate FLOAT NOT NULL, 
	ci_low FLOAT NOT NULL, 
	ci_high FLOAT NOT NULL, 
	details JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "evals" VALUES(1,1,0,'rule:short',10,6,3,1,0.65,0.36,0.86,'{"prompts": 10}','2026-11-29 11:14:29.699387');
CREATE TABLE labelers (
	id INTEGER NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	is_admin BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
INSERT INTO "labelers" VALUES(1,'ada',1,'2026-11-29 11:14:29.651976');
CREATE TABLE labels (
	id INTEGER NOT NULL, 
	pair_id INTEGER NOT NULL, 
	choice VARCHAR(10) NOT NULL, 
	shown_left VARCHAR(1), 
	labeler VARCHAR(200) NOT NULL, 
	source VARCHAR(200) NOT NULL, 
	judge_confidence FLOAT, 
	reason TEXT, 
	shown_at DATETIME, 
	answered_at DATETIME NOT NULL, 
	consumed_version INTEGER, 
	consumed_step INTEGER, 
	undone BOOLEAN NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(pair_id) REFERENCES pairs (id)
);
INSERT INTO "labels" VALUES(1,1,'a','a','ada','human',NULL,NULL,'2026-11-29 11:14:29.667568','2026-11-29 11:14:29.674346',1,1,0);
INSERT INTO "labels" VALUES(2,2,'b','b','ada','human',NULL,NULL,'2026-11-29 11:14:29.680907','2026-11-29 11:14:29.682728',1,1,0);
INSERT INTO "labels" VALUES(3,3,'tie','b','ada','human',NULL,NULL,'2026-11-29 11:14:29.686323','2026-11-29 11:14:29.688366',NULL,NULL,0);
INSERT INTO "labels" VALUES(4,1,'b',NULL,'rule-judge','judge:rule:short',0.75,NULL,NULL,'2026-11-29 11:14:29.690430',NULL,NULL,0);
CREATE TABLE pairs (
	id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	sample_a_id INTEGER NOT NULL, 
	sample_b_id INTEGER NOT NULL, 
	created_version INTEGER NOT NULL, 
	status VARCHAR(10) NOT NULL, 
	labels_wanted INTEGER NOT NULL, 
	claims INTEGER NOT NULL, 
	purpose VARCHAR(20) NOT NULL, 
	requested_by VARCHAR(200), 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(prompt_id) REFERENCES prompts (id), 
	FOREIGN KEY(sample_a_id) REFERENCES samples (id), 
	FOREIGN KEY(sample_b_id) REFERENCES samples (id)
);
INSERT INTO "pairs" VALUES(1,1,1,2,0,'labeled',1,1,'train',NULL,'2026-11-29 11:14:29.659890');
INSERT INTO "pairs" VALUES(2,2,3,4,0,'labeled',1,1,'train',NULL,'2026-11-29 11:14:29.661011');
INSERT INTO "pairs" VALUES(3,3,5,6,0,'labeled',1,1,'train',NULL,'2026-11-29 11:14:29.661814');
INSERT INTO "pairs" VALUES(4,4,7,8,0,'queued',1,0,'train',NULL,'2026-11-29 11:14:29.662886');
CREATE TABLE prompts (
	id INTEGER NOT NULL, 
	text TEXT NOT NULL, 
	text_hash VARCHAR(64) NOT NULL, 
	source VARCHAR(200) NOT NULL, 
	tags JSON NOT NULL, 
	held_out BOOLEAN NOT NULL, 
	times_sampled INTEGER NOT NULL, 
	last_sampled_at DATETIME, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (text_hash)
);
INSERT INTO "prompts" VALUES(1,'Name a colour, 0','67d6fdff24983b7866203fe6e790d1a7eec3d211b4b0605e0926a447e884766f','import','["colours"]',0,1,'2026-11-29 11:14:29.655974','2026-11-29 11:14:29.649900');
INSERT INTO "prompts" VALUES(2,'Name a colour, 1','cbc1f667cec0928d382d09d9222bf3614e9a00c339d91a6e6b28c0945b0b80a6','import','["colours"]',0,1,'2026-11-29 11:14:29.655974','2026-11-29 11:14:29.649916');
INSERT INTO "prompts" VALUES(3,'Name a colour, 2','f776e4d823cf707fd3dc93b3c63a0c74d5372f9c4111cab49a9bb692557950f1','import','["colours"]',0,1,'2026-11-29 11:14:29.655974','2026-11-29 11:14:29.649923');
INSERT INTO "prompts" VALUES(4,'Name a colour, 3','c97b6637ff9eae7ce6804d3042e0f5310d14ac6247884ce47c9cd42aaa59b55d','import','["colours"]',0,1,'2026-11-29 11:14:29.655974','2026-11-29 11:14:29.649928');
INSERT INTO "prompts" VALUES(5,'Held-out prompt','446dacedab5b05dc52baa79fd45a02e9e2303073b0f5fcc00f1d66df0c480eb5','starter','[]',1,0,NULL,'2026-11-29 11:14:29.649932');
CREATE TABLE reloads (
	id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	swap_ms FLOAT NOT NULL, 
	commit_to_serving_ms FLOAT NOT NULL, 
	retired_pairs INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "reloads" VALUES(1,1,12.5,340.0,1,'2026-11-29 11:14:29.700821');
CREATE TABLE samples (
	id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	adapter_version INTEGER NOT NULL, 
	text TEXT NOT NULL, 
	tokens INTEGER NOT NULL, 
	finish_reason VARCHAR(20) NOT NULL, 
	params JSON NOT NULL, 
	gen_seconds FLOAT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(prompt_id) REFERENCES prompts (id)
);
INSERT INTO "samples" VALUES(1,1,0,'red 1',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.658220');
INSERT INTO "samples" VALUES(2,1,0,'blue 1',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.658231');
INSERT INTO "samples" VALUES(3,2,0,'red 2',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.660483');
INSERT INTO "samples" VALUES(4,2,0,'blue 2',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.660490');
INSERT INTO "samples" VALUES(5,3,0,'red 3',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.661410');
INSERT INTO "samples" VALUES(6,3,0,'blue 3',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.661416');
INSERT INTO "samples" VALUES(7,4,0,'red 4',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.662339');
INSERT INTO "samples" VALUES(8,4,0,'blue 4',2,'stop','{"temperature": 0.8}',0.25,'2026-11-29 11:14:29.662346');
CREATE TABLE train_steps (
	id INTEGER NOT NULL, 
	run VARCHAR(100) NOT NULL, 
	step INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	label_ids JSON NOT NULL, 
	metrics JSON NOT NULL, 
	loss FLOAT NOT NULL, 
	reward_accuracy FLOAT NOT NULL, 
	reward_margin FLOAT NOT NULL, 
	kl FLOAT NOT NULL, 
	grad_norm FLOAT NOT NULL, 
	seconds FLOAT NOT NULL, 
	version_lag FLOAT NOT NULL, 
	committed BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "train_steps" VALUES(1,'default',1,1,'[1, 2]','{"loss": 0.69, "reward_accuracy": 0.5, "kl": 0.01}',0.69,0.5,0.0,0.01,0.0,0.0,0.0,1,'2026-11-29 11:14:29.692914');
CREATE INDEX ix_prompts_held_out ON prompts (held_out);
CREATE INDEX ix_samples_prompt_id ON samples (prompt_id);
CREATE INDEX ix_pairs_prompt_id ON pairs (prompt_id);
CREATE INDEX ix_pairs_status_id ON pairs (status, id);
CREATE INDEX ix_assignments_pair_id ON assignments (pair_id);
CREATE INDEX ix_labels_pair_id ON labels (pair_id);
CREATE INDEX ix_labels_consumed_version ON labels (consumed_version);
COMMIT;
